"""Typed records of the self-refine loop, from a sampled text to the DPO step's metrics.

    GenerationRequest (sampling) -> GeneratedText -> ScoredPath -> PreferencePair
        -> PreferenceExample (token ids) -> PreferenceBatch / PackedPreferenceBatch (tensors)
           (the reference pass: each distinct sequence once, packed in PackedRows or rows of an SFTBatch)
        -> ReferencedMicroBatch (its parts + reference log-probs) -> HeadInputs -> dpo_loss
        -> DPOStepMetrics (one per optimizer step, back to the driver)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional, Sequence, Tuple, Union

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
class PackedRows:
    """Sequences packed side by side, each (prompt, one or two responses) a segment of a row; the
    log-probs of every response are gathered from the row's hidden states.

    input_ids, position_ids: [R, L] long, right-padded. Position ids restart at each segment, and after
        a segment's first response: a second response sits where it would right after its prompt.
    attention_mask: [R, 1, L, L] bool, True where a query position may attend: causal within a segment,
        except that a second response never sees the first (so each response sees exactly its own
        sequence), nothing across segments. Padding attends to itself only (nothing to attend: NaN).
    positions: [S, T] long: for response token t of sequence s, the index in the flattened [R * L]
        hidden states (row * L + column) of the state that predicts it; a segment's responses are
        predicted first from its prompt's last position.
    targets: [S, T] long response token ids, -100 after each response's end.
    segments: (start, end) spans of the one row (R = 1) that attend only within themselves, for
        ``models/segments.py``'s per-segment attention; () with one segment per row. A hint only:
        the mask alone gives the same values under any attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    segments: Tuple[Tuple[int, int], ...]


@dataclass
class PackedPreferenceBatch(PackedRows):
    """B pairs packed as ``PackedRows``, one segment per pair: prompt + chosen + rejected, so the prompt
    runs through the model once. Sequences [0, B) are the chosen responses, [B, 2B) the rejected ones
    (as in ``PreferenceBatch``); one row per pair, or all pairs in one row (``segments``)."""

    uids: Tuple[str, ...]
    unpacked_tokens: int

    @property
    def num_pairs(self) -> int:
        return len(self.uids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the pairs as two sequences each (prompt counted twice), as ``PreferenceBatch``
        counts them: the unit of tokens/s, comparable with trainers that do not pack."""
        return self.unpacked_tokens


@dataclass
class ReferencedMicroBatch:
    """One micro-batch of B pairs as the learner trains it: its parts (batches of ``pairs_per_forward``
    pairs, each a DeepSpeed micro-step) and the frozen reference's summed log-probs of its pairs,
    computed once per round before training.

    parts:        PreferenceBatch or PackedPreferenceBatch, B pairs in all, in order.
    ref_chosen:   [B] float, reference log-prob of each chosen response.
    ref_rejected: [B] float, the same for the rejected ones.
    """

    parts: Tuple[Union[PreferenceBatch, PackedPreferenceBatch], ...]
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return sum(part.num_pairs for part in self.parts)

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)


class HeadInputs(NamedTuple):
    """What the fused LM-head kernels take for a batch of 2B sequences (chosen rows, then rejected).

    hidden:  [2B, T, H] final hidden states; row s, position t predicts response token t of sequence s.
    weight:  [V, H] the LM head's weight.
    targets: [2B, T] long response token ids, -100 where sequence s has no token t.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor


# DPOStepMetrics fields <-> the names on disk and in W&B (TRL's, where TRL has one).
_TRL_NAMES = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
              "rewards_accuracies": "rewards/accuracies", "rewards_margins": "rewards/margins",
              "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}


@dataclass(frozen=True)
class DPOStepMetrics:
    """One DPO optimizer step, averaged over micro-batches and ranks (sums where said); every rank
    returns the same list. ``as_dict`` gives the row of ``dpo_metrics.jsonl`` and W&B, with TRL's names."""

    round: int
    loss: float
    rewards_chosen: float  # beta * (policy - reference) log-prob of the chosen responses
    rewards_rejected: float
    rewards_accuracies: float  # share of pairs whose chosen reward beats the rejected one
    rewards_margins: float
    logps_chosen: float  # policy log-prob of the chosen responses
    logps_rejected: float
    lr: float
    grad_norm: float
    step_s: float
    tokens_per_s: float  # all ranks' tokens (pairs as two sequences) per second
    # With defaults: rows written before these existed read back (a rerun reusing an older round).
    reference_s: float = float("nan")  # the round's reference pass (loading, log-probs, freeing), on every step
    shared_prompt: bool = False  # packed rows: the prompt ran once per pair
    step_cpu_s: float = float("nan")  # CPU seconds of the step, all ranks' processes together
    peak_rss_gib: float = float("nan")  # largest peak resident memory of any rank during the step
    reference_peak_rss_gib: float = float("nan")
    # sequences (pairs x 2, all ranks) the round's reference log-probs cover, and how many of them ran
    # through the reference: the others repeat a sequence or were known from an earlier round
    reference_sequences: float = float("nan")
    reference_sequences_run: float = float("nan")
    nll_loss: Optional[float] = None  # RPO's NLL term on the chosen responses, when rpo_alpha is set

    def as_dict(self) -> dict:
        row = {_TRL_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        row["shared_prompt"] = float(self.shared_prompt)
        if self.nll_loss is None:
            del row["nll_loss"]
        return row

    @classmethod
    def from_dict(cls, row: dict) -> "DPOStepMetrics":
        """A row of ``dpo_metrics.jsonl``, back."""
        by_name = {trl: name for name, trl in _TRL_NAMES.items()}
        values = {by_name.get(k, k): v for k, v in row.items()}
        values["shared_prompt"] = bool(values.get("shared_prompt", False))
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def examples_digest(examples: Sequence[PreferenceExample]) -> str:
    """sha256 over the examples' uids and token ids, in order: equal digests, equal data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.uid, ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]).encode())
    return h.hexdigest()
