"""train/chunked_step.py: the bf16 stage-0 step a chunk of parameters at a time gives bit for bit the weights
and gradient norms of DeepSpeed's own step (FP16_UnfusedOptimizer), with and without clipping, while never
holding more than one chunk of fp32 gradients. Both engines run in one fresh process (one rank, gloo)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FRAGMENT = r"""
import json, sys
import torch
from selfrefine_dist.train.chunked_step import chunk_the_step
from selfrefine_dist.train.distributed import init_distributed
from selfrefine_dist.train.ds_config import deepspeed_config
from selfrefine_dist.train.engine import load_model
import deepspeed

model_dir, max_grad_norm, chunk_bytes = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
init_distributed()
config = deepspeed_config(micro_batch_size=2, grad_accum=2, world_size=1, zero_stage=0, dtype="bf16",
                          max_grad_norm=max_grad_norm)

def engine(chunked):
    torch.manual_seed(0)
    model = load_model(model_dir, config, trust_remote_code=False)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    eng, *_ = deepspeed.initialize(model=model, optimizer=adamw, config=config)
    assert type(eng.optimizer).__name__ == "FP16_UnfusedOptimizer", type(eng.optimizer)
    if chunked:
        assert chunk_the_step(eng, chunk_bytes)
    # the fp32 gradient bytes alive at each optimizer.step call, and the number of calls
    seen = {"calls": 0, "max_fp32_grad_bytes": 0}
    inner = eng.optimizer.optimizer
    step = inner.step
    def counting_step(*args, **kwargs):
        alive = sum(p.grad.numel() * 4 for g in inner.param_groups for p in g["params"] if p.grad is not None)
        seen["calls"] += 1
        seen["max_fp32_grad_bytes"] = max(seen["max_fp32_grad_bytes"], alive)
        return step(*args, **kwargs)
    inner.step = counting_step
    return eng, seen

(plain, plain_seen), (chunked, chunked_seen) = engine(False), engine(True)
gen = torch.Generator().manual_seed(1)
norms = {"plain": [], "chunked": []}
for micro in range(6):  # 3 optimizer steps of 2 micro-batches
    ids = torch.randint(0, 512, (2, 24), generator=gen)
    for name, eng in (("plain", plain), ("chunked", chunked)):
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        eng.step()
        if micro % 2 == 1:  # an optimizer step was taken
            norms[name].append(float(eng.get_global_grad_norm()))
weights_equal = all(torch.equal(a, b) for a, b in zip(plain.module.parameters(), chunked.module.parameters()))
masters_equal = all(torch.equal(a, b) for ga, gb in zip(plain.optimizer.fp32_groups, chunked.optimizer.fp32_groups)
                    for a, b in zip(ga, gb))
moved = max(float((a.float() - b.float()).abs().max()) for a, b in
            zip(plain.module.parameters(), load_model(model_dir, config, False).parameters()))
total = sum(p.numel() * 4 for p in plain.module.parameters())
largest = max(p.numel() * 4 for p in plain.module.parameters())
print(json.dumps({"weights_equal": weights_equal, "masters_equal": masters_equal, "norms": norms, "moved": moved,
                  "plain": plain_seen, "chunked": chunked_seen, "total": total, "largest": largest}))
"""


@pytest.mark.parametrize("max_grad_norm", [1.0, 1e-3])  # 1e-3 clips every step
def test_chunked_step_equals_deepspeeds_step_and_holds_one_chunk(tiny_model_dir, max_grad_norm):
    chunk_bytes = 100_000  # the tiny model's fp32 gradients (about 1 MB) in several chunks
    out = subprocess.run([sys.executable, "-c", FRAGMENT, str(tiny_model_dir), str(max_grad_norm), str(chunk_bytes)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["moved"] > 1e-3  # the weights trained
    assert result["weights_equal"] and result["masters_equal"]
    assert result["norms"]["chunked"] == result["norms"]["plain"] and len(result["norms"]["plain"]) == 3
    # DeepSpeed's step holds every fp32 gradient at once; the chunked one at most a chunk and one parameter
    assert result["plain"]["calls"] == 3 and result["plain"]["max_fp32_grad_bytes"] == result["total"]
    assert result["chunked"]["calls"] > 3 * 3
    assert result["chunked"]["max_fp32_grad_bytes"] < chunk_bytes + result["largest"]
