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
    correct, reason: the reward's verdict. Under the "step_checked" reward a path whose final answer
        is right but whose steps are not gets correct=False, reason="wrong_step" (a lucky path).
    model_version: the policy version that sampled it (0 = the SFT model, r = after round r).
    steps_ok: whether its intermediate steps check out (``rewards.steps``); None when the task
        has no step checker or the path is a direct answer. Last, with a default, so that rows
        written before it existed still load with ``ScoredPath(**row)``.
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
    steps_ok: Optional[bool] = None

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


@dataclass
class PackedPreferenceBatch:
    """B pairs, one row each: prompt + chosen + rejected, so the prompt runs through the model once.

    input_ids, position_ids: [B, L] long, right-padded. Position ids restart after the chosen
        response: the rejected tokens sit at the positions they would have right after the prompt.
    attention_mask: [B, 1, L, L] bool, True where a query position may attend: causal, except that
        rejected tokens never see chosen ones (so each response sees exactly its own sequence).
        Padding positions attend to themselves only (a row with nothing to attend gives NaN).
    positions: [2B, T] long: the position in row (s mod B) whose hidden state predicts response
        token t of sequence s; rows [0, B) chosen, [B, 2B) rejected (as in ``PreferenceBatch``).
        Both responses' first tokens are predicted from the prompt's last position.
    targets: [2B, T] long response token ids, -100 after each response's end.
    """

    uids: Tuple[str, ...]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    unpacked_tokens: int

    @property
    def num_pairs(self) -> int:
        return len(self.uids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the pairs as two sequences each (prompt counted twice), as ``PreferenceBatch``
        counts them: the unit of tokens/s, comparable with trainers that do not pack."""
        return self.unpacked_tokens


def examples_digest(examples: Sequence[PreferenceExample]) -> str:
    """sha256 over the examples' uids and token ids, in order: equal digests, equal data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.uid, ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]).encode())
    return h.hexdigest()
