"""Pure pieces of weight sync and seeding: buckets, flattening, expected checksums, item seeds."""
import torch

from selfrefine_dist.sampling.records import GenerationRequest, work_item_seed
from selfrefine_dist.sampling.weights import (expected_checksums, flatten_bucket, named_tensor_buckets, tensor_sha256,
                                              unflatten_bucket)


def _named(*shapes):
    return [(f"t{i}", torch.randn(shape)) for i, shape in enumerate(shapes)]


def test_buckets_keep_order_and_respect_the_byte_limit():
    named = _named((4,), (4,), (4,), (10,), (2,))  # 16, 16, 16, 40, 8 bytes
    buckets = list(named_tensor_buckets(named, bucket_bytes=32))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert all(t is named[int(n[1:])][1] for b in buckets for n, t in b)  # no copies


def test_flatten_round_trip_mixed_dtypes():
    bucket = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)), ("c", torch.randn(4).bfloat16()),
              ("d", torch.randn(6, 2).t())]  # a non-contiguous view
    flat, metas = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() >= sum(t.numel() * t.element_size() for _, t in bucket)
    assert all(m.offset % 64 == 0 for m in metas)
    for (name, original), (name2, restored) in zip(bucket, unflatten_bucket(flat.clone(), metas)):
        assert name == name2 and restored.dtype == original.dtype and torch.equal(restored, original)


def test_expected_vllm_checksums_fuse_qkv_and_gate_up():
    sd = {name: torch.randn(shape) for name, shape in {
        "model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4), "model.norm.weight": (4,),
        "model.layers.0.self_attn.q_proj.weight": (4, 4), "model.layers.0.self_attn.k_proj.weight": (2, 4),
        "model.layers.0.self_attn.v_proj.weight": (2, 4), "model.layers.0.self_attn.q_proj.bias": (4,),
        "model.layers.0.self_attn.k_proj.bias": (2,), "model.layers.0.self_attn.v_proj.bias": (2,),
        "model.layers.0.mlp.gate_proj.weight": (6, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
    }.items()}
    got = expected_checksums(sd, "vllm", "fp32", tie_word_embeddings=True)
    prefix = "model.layers.0."
    assert set(got) == {"model.embed_tokens.weight", "model.norm.weight", prefix + "self_attn.qkv_proj.weight",
                        prefix + "self_attn.qkv_proj.bias", prefix + "mlp.gate_up_proj.weight"}
    qkv = torch.cat([sd[prefix + f"self_attn.{m}_proj.weight"] for m in "qkv"])
    assert got[prefix + "self_attn.qkv_proj.weight"] == tensor_sha256(qkv)
    gate_up = torch.cat([sd[prefix + "mlp.gate_proj.weight"], sd[prefix + "mlp.up_proj.weight"]])
    assert got[prefix + "mlp.gate_up_proj.weight"] == tensor_sha256(gate_up)
    # Untied, HF naming: every tensor under its own name; bf16 digests differ from fp32 ones.
    hf = expected_checksums(sd, "hf", "bf16", tie_word_embeddings=False)
    assert set(hf) == set(sd) and hf["lm_head.weight"] == tensor_sha256(sd["lm_head.weight"].bfloat16())
    assert hf["model.norm.weight"] != got["model.norm.weight"]


def test_work_item_seed_depends_on_seed_and_requests_only():
    items = [GenerationRequest("a", "p", 2), GenerationRequest("b", "q", 1)]
    assert work_item_seed(3, items) == work_item_seed(3, list(items))
    assert work_item_seed(3, items) != work_item_seed(4, items)
    assert work_item_seed(3, items) != work_item_seed(3, items[::-1])
    assert work_item_seed(3, items) != work_item_seed(3, [items[0], GenerationRequest("b", "q", 2)])
