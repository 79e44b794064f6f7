"""Typed records for reasoning data, from loading to the SFT batch.

    source rows -> ReasoningExample -> (filter demonstrations) -> SFTExample -> SFTBatch
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class ReasoningExample:
    """One question of a registered task, with its gold answer.

    ``answer`` is a number (as text, e.g. "72" or "0.5") for math tasks and an
    option letter ("A".."E") for multiple choice, whose option texts are
    ``choices`` in letter order. ``rationale`` is a chain of thought that ends
    in the answer (a teacher's demonstration, or the dataset's own), if any.
    """

    uid: str
    task: str
    question: str
    answer: str
    choices: Tuple[str, ...] = ()
    rationale: Optional[str] = None


@dataclass(frozen=True)
class SFTExample:
    """A tokenized (prompt, response) pair; the loss covers response tokens only.

    input_ids: prompt tokens followed by response tokens, [seq_len].
    labels:    -100 on prompt tokens, the token id on response tokens, [seq_len].
    """

    uid: str
    input_ids: Tuple[int, ...]
    labels: Tuple[int, ...]

    @property
    def num_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


@dataclass
class SFTBatch:
    """Right-padded micro-batch.

    input_ids:      [batch, seq_len] long, pad_token_id after each sequence.
    attention_mask: [batch, seq_len] long, 1 on real tokens.
    labels:         [batch, seq_len] long, -100 on prompt and padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    uids: Tuple[str, ...] = field(default=())

    @property
    def num_response_tokens(self) -> int:
        # labels are aligned with input_ids; the first token is never a target.
        return int((self.labels[:, 1:] != -100).sum())
