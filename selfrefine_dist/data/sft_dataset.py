"""Turn reasoning examples into tokenized SFT examples, and batch them.

The prompt is the task's user turn rendered with the tokenizer's own chat
template; the response is the demonstration ("cot": rationale and answer
sentence) or the answer sentence alone ("direct"), chosen per training slice.
Labels are -100 on the prompt so the loss covers response tokens only. Examples
longer than ``max_len`` are dropped and counted: truncating would cut the answer
off the demonstration.

    SFTSlice (examples, style) -> [cot: select_demonstrations] -> build_sft_examples -> SFTExample
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from selfrefine_dist.data.demonstrations import DemonstrationReport, select_demonstrations
from selfrefine_dist.data.records import ReasoningExample, SFTBatch, SFTExample
from selfrefine_dist.data.tasks import get_task

IGNORE_INDEX = -100


def render_prompt(tokenizer, user_text: str) -> str:
    """The text a model sees before it answers: chat template with a generation prompt.

    Tokenizers without a chat template (base models) get a plain
    "Question: ...\\nAnswer:" frame.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {user_text}\nAnswer: "


def render_conversation(tokenizer, user_text: str, response: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}, {"role": "assistant", "content": response}], tokenize=False
        )
    return f"Question: {user_text}\nAnswer: {response}{tokenizer.eos_token or ''}"


def tokenize_pair(tokenizer, uid: str, user_text: str, response: str) -> SFTExample:
    prompt_text = render_prompt(tokenizer, user_text)
    full_text = render_conversation(tokenizer, user_text, response)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"{uid}: the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    input_ids = tuple(prompt_ids) + tuple(response_ids)
    labels = (IGNORE_INDEX,) * len(prompt_ids) + tuple(response_ids)
    return SFTExample(uid=uid, input_ids=input_ids, labels=labels)


@dataclass
class TokenizeReport:
    kept: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)
    max_len: int = 0

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dropped": dict(self.dropped), "max_len": self.max_len}

    @classmethod
    def combine(cls, reports: Sequence["TokenizeReport"], max_len: int) -> "TokenizeReport":
        dropped: Counter = Counter()
        for report in reports:
            dropped.update(report.dropped)
        return cls(kept=sum(r.kept for r in reports), dropped=dict(dropped), max_len=max_len)


def build_sft_examples(
    examples: Sequence[ReasoningExample], tokenizer, max_len: int, style: str = "cot"
) -> Tuple[List[SFTExample], TokenizeReport]:
    """Tokenize every example; those over ``max_len`` tokens are dropped and counted."""
    kept: List[SFTExample] = []
    dropped: Counter = Counter()
    for ex in examples:
        spec = get_task(ex.task)
        item = tokenize_pair(tokenizer, ex.uid, spec.user_prompt(ex, style), spec.target_response(ex, style))
        if len(item.input_ids) > max_len:
            dropped["too_long"] += 1
            continue
        kept.append(item)
    return kept, TokenizeReport(kept=len(kept), dropped=dict(dropped), max_len=max_len)


@dataclass(frozen=True)
class SFTSlice:
    """One training slice (a ``data.train`` entry) and the target style it trains with.

    style "cot": the rationale closed by the answer sentence; only demonstrations whose final
    answer matches the gold answer are kept. "direct": the answer sentence alone, e.g. a
    commonsense slice with no teacher rationale teaching the answer format ("The answer is B.").
    """

    name: str  # e.g. "data.train[1] csqa/train", for the report
    style: str
    examples: Tuple[ReasoningExample, ...]


@dataclass
class SliceReport:
    name: str
    style: str
    loaded: int
    demonstrations: Optional[DemonstrationReport]  # cot slices only
    tokenize: TokenizeReport

    def as_dict(self) -> dict:
        return {"name": self.name, "style": self.style, "loaded": self.loaded,
                "demonstrations": self.demonstrations.as_dict() if self.demonstrations else None,
                "tokenize": self.tokenize.as_dict()}

    def summary(self) -> str:
        demos = f"; {self.demonstrations.summary()}" if self.demonstrations else ""
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.tokenize.dropped.items())) or "none"
        return (f"{self.name} ({self.style}): {self.tokenize.kept} sft examples of {self.loaded} loaded"
                f"{demos}; tokenize dropped: {dropped}")


@dataclass
class SFTDataReport:
    """Per-slice counts, and their totals over all slices."""

    slices: List[SliceReport]
    max_len: int

    @property
    def demonstrations(self) -> Optional[DemonstrationReport]:
        checked = [s.demonstrations for s in self.slices if s.demonstrations is not None]
        return DemonstrationReport.combine(checked) if checked else None

    @property
    def tokenize(self) -> TokenizeReport:
        return TokenizeReport.combine([s.tokenize for s in self.slices], self.max_len)

    def as_dict(self) -> dict:
        demonstrations = self.demonstrations
        return {"demonstrations": demonstrations.as_dict() if demonstrations else None,
                "tokenize": self.tokenize.as_dict(), "slices": [s.as_dict() for s in self.slices]}


def build_sft_data(slices: Sequence[SFTSlice], tokenizer, max_len: int) -> Tuple[List[SFTExample], SFTDataReport]:
    """Every slice filtered (cot) and tokenized with its own style; examples in slice order."""
    sft_examples: List[SFTExample] = []
    reports: List[SliceReport] = []
    for data_slice in slices:
        if data_slice.style == "cot":
            examples, demo_report = select_demonstrations(data_slice.examples)
        elif data_slice.style == "direct":
            examples, demo_report = list(data_slice.examples), None
        else:
            raise ValueError(
                f"{data_slice.name}: unknown prompt style {data_slice.style!r}: expected 'cot' or 'direct'"
            )
        kept, tok_report = build_sft_examples(examples, tokenizer, max_len, data_slice.style)
        sft_examples += kept
        loaded = len(data_slice.examples)
        reports.append(SliceReport(data_slice.name, data_slice.style, loaded, demo_report, tok_report))
    return sft_examples, SFTDataReport(reports, max_len)


def collate(items: Sequence[SFTExample], pad_token_id: int) -> SFTBatch:
    """Right-pad a list of examples into one batch."""
    width = max(len(it.input_ids) for it in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        attention_mask[row, :n] = 1
    return SFTBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, uids=tuple(it.uid for it in items))
