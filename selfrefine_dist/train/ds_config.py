"""The DeepSpeed config dict for a learner, built from plain values."""
from __future__ import annotations

from typing import Optional


def resolve_zero_stage(zero_stage: Optional[int], world_size: int) -> int:
    """``distributed.zero_stage``; None: 0 for one rank (ZeRO has nothing to partition there, and stage 0
    keeps no flat copies of weights and gradients), 3 for several."""
    if zero_stage is not None:
        return zero_stage
    return 0 if world_size == 1 else 3


def deepspeed_config(
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    zero_stage: int = 3,
    dtype: str = "bf16",
    max_grad_norm: float = 1.0,
    offload_optimizer: bool = False,
) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update(
            # export and weight sync gather full 16-bit weights on rank 0
            stage3_gather_16bit_weights_on_model_save=True,
            # small models: do not keep parameters resident just because they are small
            stage3_param_persistence_threshold=0,
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "auto_cast": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
