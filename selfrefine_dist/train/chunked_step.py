"""The bf16 optimizer step of an unpartitioned learner (ZeRO stage 0), a few parameters at a time.

At stage 0 with bf16 weights DeepSpeed wraps the optimizer in ``FP16_UnfusedOptimizer``: fp32 master
weights beside the bf16 model, bf16 gradients accumulated on the model. Its step first copies *every*
gradient to fp32, then steps, then drops the copies: for a moment the process holds all bf16 gradients
(2 bytes per parameter) and all fp32 ones (4 bytes) on top of weights and Adam state; on a CPU learner
that moment is the peak of the round.

``chunk_the_step(engine)`` gives that wrapper a step with the same arithmetic in another order:

    norm  = global norm of the bf16 gradients (as DeepSpeed computes it), clip scale from it
    for each chunk of parameters (about ``chunk_bytes`` of fp32 gradient):
        fp32 grad = bf16 grad -> fp32, scaled;  bf16 grad dropped
        optimizer.step()                       # torch optimizers skip parameters without a gradient
        fp32 grad dropped;  bf16 weight <- fp32 master weight

Adam's state (moments and step count) is per parameter and a parameter's update reads only its own
gradient, so stepping the chunks one after another gives bit for bit the weights of one step over all
(``tests/train/test_chunked_step.py``); the peak then holds one chunk of fp32 gradients instead of all.
"""
from __future__ import annotations

import functools
from typing import Iterator, List, Tuple

import torch

CHUNK_BYTES = 64 << 20  # fp32 gradient bytes per chunk: a few layers of a small model, one large matrix


def chunk_the_step(engine, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """Give ``engine``'s bf16/fp16 stage-0 optimizer wrapper the chunked step; True if it has one now.
    Other wrappers (ZeRO stages, fp32 without a wrapper) keep theirs."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    if type(wrapper) is not FP16_UnfusedOptimizer or wrapper.fused_lamb_legacy:
        return isinstance(wrapper, ChunkedStepMixin)
    wrapper.__class__ = _chunked_unfused_optimizer()
    wrapper.chunk_bytes = int(chunk_bytes)
    return True


@functools.cache
def _chunked_unfused_optimizer() -> type:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return type("ChunkedUnfusedOptimizer", (ChunkedStepMixin, FP16_UnfusedOptimizer), {})


class ChunkedStepMixin:
    """``step`` for DeepSpeed's ``FP16_UnfusedOptimizer`` (its attributes: ``fp16_groups`` of model
    parameters, ``fp32_groups`` of master weights, ``optimizer``, the overflow checker and loss scale)."""

    chunk_bytes: int

    def step(self, closure=None):
        from deepspeed.moe.utils import split_params_grads_into_shared_and_expert_params
        from deepspeed.runtime.utils import get_global_norm, get_weight_norm, is_invalid_grad_norm

        self.overflow = self.overflow_checker.check()
        if self.overflow:
            return self._skip_invalid_grad_norm()
        norm_groups = []
        for group in self.fp16_groups:
            grads_for_norm, _ = split_params_grads_into_shared_and_expert_params(group)
            norm_groups.append(get_weight_norm(grads_for_norm, mpu=self.mpu) if grads_for_norm else 0.0)
        self._global_grad_norm = get_global_norm(norm_list=norm_groups)
        if is_invalid_grad_norm(self._global_grad_norm):
            return self._skip_invalid_grad_norm()
        self._update_scale(False)
        combined_scale = self.unscale_and_clip_grads(self._global_grad_norm, apply_scale=False)

        for chunk in self._chunks():
            for master, model_param in chunk:
                if model_param.grad is None:
                    master.grad = torch.zeros(model_param.size(), dtype=master.dtype, device=master.device)
                else:
                    master.grad = model_param.grad.to(master.dtype)
                    model_param.grad = None
                master.grad.mul_(1.0 / combined_scale)
            self.optimizer.step()
            for master, model_param in chunk:
                master.grad = None
                model_param.data.copy_(master.data)
        return self.overflow

    def _chunks(self) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """(master, model parameter) pairs in runs of about ``chunk_bytes`` of fp32 gradient."""
        chunk: List[Tuple[torch.Tensor, torch.Tensor]] = []
        size = 0
        for fp32_group, model_group in zip(self.fp32_groups, self.fp16_groups):
            for master, model_param in zip(fp32_group, model_group):
                chunk.append((master, model_param))
                size += master.numel() * master.element_size()
                if size >= self.chunk_bytes:
                    yield chunk
                    chunk, size = [], 0
        if chunk:
            yield chunk
