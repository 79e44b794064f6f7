"""Typed records of the self-refine loop, from a sampled text to the DPO batch.

    GenerationRequest (sampling) -> GeneratedText -> ScoredPath -> PreferencePair
        -> PreferenceExample (token ids) -> PreferenceBatch (tensors) -> dpo_loss
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class ScoredPath:
    """One sampled answer to one question, with its reward.

    style: "cot" (a reasoning path) or "direct" (asked for the answer only).
    model_version: the policy version that sampled it (0 = the SFT model, r = after round r).
    """

    uid: str
    task: str
    style: str
    index: int  # which of the K samples
    text: str
    num_tokens: int
    finish_reason: str
    correct: bool
    extracted: Optional[str]
    reason: str
    model_version: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred response (texts, before tokenizing).

    prompt: the chat-rendered prompt both responses answer.
    chosen_source / rejected_source: where each came from ("cot_correct", "cot_incorrect",
        "direct", "teacher").
    """

    uid: str
    task: str
    prompt: str
    chosen: str
    rejected: str
    chosen_source: str
    rejected_source: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreferenceExample:
    """A tokenized pair: prompt ids shared by both responses."""

    uid: str
    prompt_ids: Tuple[int, ...]
    chosen_ids: Tuple[int, ...]
    rejected_ids: Tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PreferenceBatch:
    """B pairs as one right-padded batch of 2B sequences: rows [0, B) chosen, [B, 2B) rejected.

    input_ids:      [2B, T] long, pad after each sequence.
    attention_mask: [2B, T] long, 1 on real tokens.
    labels:         [2B, T] long, -100 on prompt and padding (loss on response tokens only).
    """

    uids: Tuple[str, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return len(self.uids)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def examples_digest(examples: Sequence[PreferenceExample]) -> str:
    """sha256 over the examples' uids and token ids, in order: equal digests, equal data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.uid, ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]).encode())
    return h.hexdigest()
