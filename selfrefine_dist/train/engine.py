"""DeepSpeed engines for every learner recipe (SFT in ``train/sft.py``, DPO in ``refine/learner.py``):
one way to load a model, wrap it with its optimizer, step it and read its gradient norm.

    model = load_model(path, ds_config, trust_remote_code)          # ZeRO-3: each rank loads its partition
    engine = wrap(model, ds_config, AdamWSettings(lr, betas, wd), lr_lambda=schedule)   # training
    reference = wrap(load_model(path, ds_config, ...), ds_config)   # frozen: no optimizer, eval mode
    optimizer_step(engine)                                           # engine.step(), gradient norm kept
    grad_norm(engine)                                                # of the last optimizer step

The learning rate follows ``schedule.WarmupThenDecay`` in both recipes: SFT hands it to DeepSpeed as a
``LambdaLR`` (its state is checkpointed with the run); a DPO round is a fresh run, so the learner sets
``lr * schedule(step)`` on the optimizer itself each step (``set_lr``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from selfrefine_dist.train.chunked_step import chunk_the_step
from selfrefine_dist.train.memory import trim_after_step


@dataclass(frozen=True)
class AdamWSettings:
    lr: float
    betas: Tuple[float, float]
    weight_decay: float


def load_model(path: str, ds_config: dict, trust_remote_code: bool, revision: Optional[str] = None):
    """The causal LM at ``path`` in fp32 (DeepSpeed casts to the config's dtype). Under ZeRO-3 each rank
    loads only its partition (transformers' ``HfDeepSpeedConfig`` hook, alive during the load only)."""
    from transformers.integrations import HfDeepSpeedConfig

    from selfrefine_dist.models.loading import load_causal_lm

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    model = load_causal_lm(path, "fp32", trust_remote_code, revision)
    del hf_ds_config  # later from_config calls (export) must build ordinary models
    return model


def wrap(model, ds_config: dict, optimizer: Optional[AdamWSettings] = None,
         lr_lambda: Optional[Callable[[int], float]] = None):
    """``model`` in a DeepSpeed engine: with AdamW over its trainable parameters (and a ``LambdaLR`` when
    ``lr_lambda`` is given), or frozen (no gradients, eval mode) without ``optimizer``."""
    import deepspeed

    if optimizer is None:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    # fused: one kernel per parameter, no temporaries the size of each parameter (CPU and CUDA alike)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=optimizer.lr,
                              betas=tuple(optimizer.betas), weight_decay=optimizer.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_lambda) if lr_lambda is not None else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw, lr_scheduler=scheduler, config=ds_config)
    chunk_the_step(engine)  # stage 0 in bf16: fp32 gradient copies a chunk at a time, not all at once
    skip_lone_allreduce(engine)
    return engine


def skip_lone_allreduce(engine) -> bool:
    """Turn off the gradient all-reduce of a stage-0 engine with one data-parallel rank; returns whether
    it did. There DeepSpeed still flattens every gradient into buckets, all-reduces them over the one
    rank, divides by 1 and copies them back at each optimizer step (0.25 s a step for a 135M model in
    fp32 on 2 cores): the gradients come out as they went in. ZeRO stages >= 1 keep the call, which
    also hands the gradients to their partitioned optimizer."""
    if engine.zero_optimization_stage() != 0 or engine.dp_world_size != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


def resolve_per_forward(per_forward: Optional[int], micro_batch_size: int, key: str) -> int:
    """Sequences (SFT examples, DPO pairs) per forward/backward inside a micro-batch: None is 1 on CPU
    (matmuls need no batch there: no padding to the longest, the activations of one at a time), the
    whole micro-batch on GPU. It must divide the micro-batch; ``key`` names the setting in the error."""
    if per_forward is None:
        per_forward = micro_batch_size if torch.cuda.is_available() else 1
    if per_forward < 1 or micro_batch_size % per_forward:
        raise ValueError(f"{key} ({per_forward}) must divide the micro-batch size ({micro_batch_size})")
    return per_forward


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(engine) -> None:
    """``engine.step()`` (a micro-step; the optimizer steps at the accumulation boundary), keeping the
    gradient norm where DeepSpeed keeps none: ZeRO stage 0 in fp32 runs the torch optimizer unwrapped,
    its gradients already reduced over ranks here. On CPU the heap is trimmed after every micro-step
    under ``distributed.cpu_memory: lean`` (``train/memory.py``)."""
    boundary = engine.is_gradient_accumulation_boundary()
    if engine.optimizer is engine.basic_optimizer and boundary:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        engine.selfrefine_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan")
    engine.step()
    if not torch.cuda.is_available():
        trim_after_step()  # lean: the micro-step's freed activations back to the OS before the next forward


def grad_norm(engine) -> float:
    """The gradient norm of the last optimizer step (before clipping); NaN before any."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else getattr(engine, "selfrefine_grad_norm", float("nan"))
