"""train/engine.py: a one-rank stage-0 engine without DeepSpeed's gradient all-reduce, stepped by
``optimizer_step``, trains bit for bit like DeepSpeed's own engine with it (fp32, and bf16 with the chunked
step), never runs the bucketed all-reduce, and trims the heap after every micro-step (cpu_memory lean); a
ZeRO-1 engine keeps the all-reduce. The engines run in one fresh process (one rank, gloo)."""
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
import selfrefine_dist.train.engine as engine_module
from selfrefine_dist.train.engine import AdamWSettings, load_model, optimizer_step, skip_lone_allreduce, wrap
import deepspeed

trims = []
trim = engine_module.trim_after_step
engine_module.trim_after_step = lambda: trims.append(trim())  # counts the calls, still trims

model_dir, dtype = sys.argv[1], sys.argv[2]
init_distributed()
config = deepspeed_config(micro_batch_size=2, grad_accum=2, world_size=1, zero_stage=0, dtype=dtype, max_grad_norm=1.0)
settings = AdamWSettings(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

def count_bucketed_allreduce(eng):
    seen = {"calls": 0}
    inner = eng.buffered_allreduce_fallback
    def counting(*args, **kwargs):
        seen["calls"] += 1
        return inner(*args, **kwargs)
    eng.buffered_allreduce_fallback = counting
    return seen

def deepspeeds_own():  # what wrap() builds, all-reduce left on
    torch.manual_seed(0)
    model = load_model(model_dir, config, trust_remote_code=False)
    adamw = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas,
                              weight_decay=settings.weight_decay, fused=True)
    eng, *_ = deepspeed.initialize(model=model, optimizer=adamw, config=config)
    chunk_the_step(eng)
    return eng

torch.manual_seed(0)
ours = wrap(load_model(model_dir, config, trust_remote_code=False), config, settings)
theirs = deepspeeds_own()
seen = {"ours": count_bucketed_allreduce(ours), "theirs": count_bucketed_allreduce(theirs)}
gen = torch.Generator().manual_seed(1)
for micro in range(6):  # 3 optimizer steps of 2 micro-batches
    ids = torch.randint(0, 512, (2, 24), generator=gen)
    for eng in (ours, theirs):
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        optimizer_step(eng) if eng is ours else eng.step()
weights_equal = all(torch.equal(a, b) for a, b in zip(ours.module.parameters(), theirs.module.parameters()))
moved = max(float((a.float() - b.float()).abs().max()) for a, b in
            zip(ours.module.parameters(), load_model(model_dir, config, False).parameters()))
zero1 = deepspeed_config(micro_batch_size=2, grad_accum=2, world_size=1, zero_stage=1, dtype=dtype, max_grad_norm=1.0)
stage1 = wrap(load_model(model_dir, zero1, trust_remote_code=False), zero1, settings)
print(json.dumps({"weights_equal": weights_equal, "moved": moved, "ours": seen["ours"]["calls"],
                  "theirs": seen["theirs"]["calls"], "trims": trims, "ours_allreduce": ours.enable_backward_allreduce,
                  "stage1_allreduce": stage1.enable_backward_allreduce, "stage1_skipped": skip_lone_allreduce(stage1)}))
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_lone_stage0_rank_skips_the_allreduce_and_trains_the_same_weights(tiny_model_dir, dtype):
    out = subprocess.run([sys.executable, "-c", FRAGMENT, str(tiny_model_dir), dtype],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["moved"] > 1e-3  # the weights trained
    assert result["weights_equal"]
    assert result["theirs"] == 3 and result["ours"] == 0  # one bucketed all-reduce per optimizer step, or none
    assert result["ours_allreduce"] is False
    assert result["trims"] == [True] * 6  # after each of the 6 micro-steps, not only the 3 optimizer steps
    assert result["stage1_allreduce"] is True and result["stage1_skipped"] is False
