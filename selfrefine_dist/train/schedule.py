"""Which examples each rank trains on at each step: a pure function of (seed, epoch, step).

Keeping no iterator state makes resume exact: the position in the data is just
the global step. The examples of one optimizer step are the same whatever the
split into micro-batches, accumulation steps and ranks, which is what makes
"batch 1 x accumulation 4" equal "batch 4 x accumulation 1".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The last partial batch of an epoch is dropped, so every step has the same size.
        return self.num_examples // self.global_batch_size

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} training examples do not fill one global batch of {self.global_batch_size} "
                "(micro_batch_size x grad_accum x world size)"
            )
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def epochs_for(self, total_steps: int) -> int:
        return math.ceil(total_steps / self.steps_per_epoch)

    def step_indices(self, global_step: int) -> List[int]:
        """All example indices of one optimizer step, in order: [global_batch_size]."""
        epoch, step = divmod(global_step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_examples, generator=g)
        start = step * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def micro_batches(self, global_step: int, rank: int) -> List[List[int]]:
        """This rank's micro-batches of one step: [grad_accum][micro_batch_size] indices.

        The step's examples are laid out [accumulation step][rank][micro batch].
        """
        indices = self.step_indices(global_step)
        per_accum = self.micro_batch_size * self.world_size
        out = []
        for a in range(self.grad_accum):
            chunk = indices[a * per_accum : (a + 1) * per_accum]
            out.append(chunk[rank * self.micro_batch_size : (rank + 1) * self.micro_batch_size])
        return out


class WarmupThenDecay:
    """LR multiplier: linear warm-up, then cosine, linear or no decay (a picklable callable)."""

    def __init__(self, warmup_steps: int, total_steps: int, kind: str):
        self.warmup_steps, self.total_steps, self.kind = warmup_steps, max(total_steps, 1), kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
