"""Turn reasoning examples into tokenized SFT examples, and batch them.

The prompt is the task's user turn rendered with the tokenizer's own chat
template; the response is the demonstration. Labels are -100 on the prompt so
the loss covers response tokens only. Examples longer than ``max_len`` are
dropped and counted: truncating would cut the answer off the demonstration.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

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
