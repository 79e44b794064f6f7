"""SamplerPool on the HF backend: real Ray actors on CPU, the tiny Llama."""
import pytest

from selfrefine_dist.sampling.pool import SamplerPool
from selfrefine_dist.sampling.records import SamplingSettings
from selfrefine_dist.sampling.weights import expected_checksums

from sampling_helpers import (assert_complete, kill_processes_titled, make_requests, perturbed_state_dict, put_buckets,
                              sampler_config)

pytestmark = pytest.mark.slow
SETTINGS = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5)


@pytest.fixture(scope="module")
def pools(ray_cluster, tiny_model_dir):
    one = SamplerPool(sampler_config("hf", num_actors=1), str(tiny_model_dir), "fp32")
    two = SamplerPool(sampler_config("hf", num_actors=2), str(tiny_model_dir), "fp32")
    yield one, two
    one.shutdown()
    two.shutdown()


def test_every_key_once_with_n_texts_and_the_same_texts_on_1_or_2_actors(pools, tiny_model_dir):
    one, two = pools
    requests = make_requests(tiny_model_dir, 9)  # 5 work items of 2 questions (the last has 1)
    by_two = two.generate(requests, SETTINGS, progress=False)
    assert_complete(requests, by_two)
    stats = two.last_stats
    assert stats.questions == 9 and stats.samples == sum(r.n for r in requests) and stats.retried_items == 0
    assert stats.generated_tokens == sum(t.num_tokens for texts in by_two.values() for t in texts) > 0
    assert stats.tokens_per_s > 0
    assert one.generate(requests, SETTINGS, progress=False) == by_two
    # Sampling, not copies: a request's n texts differ, and another seed gives other texts.
    assert len({t.text for t in by_two[requests[2].key]}) > 1
    other_seed = SamplingSettings(SETTINGS.temperature, SETTINGS.top_p, SETTINGS.max_new_tokens, seed=6)
    assert one.generate(requests, other_seed, progress=False) != by_two


def test_greedy_gives_n_identical_texts(pools, tiny_model_dir):
    _, two = pools
    requests = make_requests(tiny_model_dir, 3, n=lambda i: 3)
    results = two.generate(requests, SamplingSettings(0.0, 1.0, 8, seed=0), progress=False)
    assert_complete(requests, results)
    assert all(len(set(texts)) == 1 for texts in results.values())


def test_update_weights_then_checksums_match_the_sent_state_dict(pools, tiny_model_dir):
    _, two = pools
    state_dict = perturbed_state_dict(tiny_model_dir, seed=1)
    expected = expected_checksums(state_dict, "hf", "fp32", tie_word_embeddings=True)
    before = two.checksums()
    assert len(before) == 2 and all(set(c) == set(expected) and c != expected for c in before)
    seconds = two.update_weights(put_buckets(state_dict), version=1)
    assert seconds > 0 and two.version == 1 and two.versions() == [1, 1]
    assert two.checksums() == [expected, expected]


def test_peak_memory_leaves_out_an_actor_that_was_killed_and_does_not_raise(ray_cluster, tiny_model_dir):
    import os
    import signal

    import ray

    pool = SamplerPool(sampler_config("hf", num_actors=2), str(tiny_model_dir), "fp32")
    try:
        both = pool.peak_rss_gib()
        _, pid = ray.get(pool.actors[1].where.remote())
        os.kill(pid, signal.SIGKILL)  # restarting now, as in the soak test's kills between rounds
        after = pool.peak_rss_gib()
        assert 0 < after <= both * 1.5  # the live actor's figure
    finally:
        pool.shutdown()


def test_an_actor_killed_while_it_starts_is_restarted_and_the_pool_starts(ray_cluster, tiny_model_dir):
    import ray

    killer = kill_processes_titled("ray::SamplerActor.__init__", count=1)
    pool = SamplerPool(sampler_config("hf", num_actors=1), str(tiny_model_dir), "fp32")
    killer.join()
    try:
        assert len(killer.killed) == 1  # killed once while building its backend; Ray restarted it
        assert ray.get(pool.actors[0].ready.remote()) != killer.killed[0]  # a new process
        requests = make_requests(tiny_model_dir, 3)
        assert_complete(requests, pool.generate(requests, SETTINGS, progress=False))
    finally:
        pool.shutdown()


def test_an_actor_killed_at_every_start_gives_up_after_max_restarts_naming_the_key(ray_cluster, tiny_model_dir):
    config = sampler_config("hf", num_actors=1)  # max_restarts=2: three starts
    killer = kill_processes_titled("ray::SamplerActor.__init__", count=config.max_restarts + 1)
    with pytest.raises(RuntimeError, match=r"sampler actor 0 died 3 times while starting \(sampler.max_restarts=2\)"):
        SamplerPool(config, str(tiny_model_dir), "fp32")
    killer.join()


def test_an_actor_whose_constructor_raises_fails_the_pool_at_once(ray_cluster, tmp_path):
    import ray

    with pytest.raises(ray.exceptions.ActorDiedError, match="creation task"):
        SamplerPool(sampler_config("hf", num_actors=1), str(tmp_path / "no_model_here"), "fp32")
