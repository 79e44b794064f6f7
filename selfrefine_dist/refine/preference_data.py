"""Preference pairs -> token ids -> each learner rank's micro-batches for one round.

The driver builds every rank's share here and puts it in the Ray object store; a learner
receives an object reference, never a file path, so what it trains on is exactly what was
built (``examples_digest`` checks that).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

from selfrefine_dist.data.records import SFTBatch
from selfrefine_dist.data.sft_dataset import render_conversation, render_prompt
from selfrefine_dist.models.segments import segment_spans
from selfrefine_dist.refine.records import (PackedPreferenceBatch, PackedRows, PreferenceBatch, PreferenceExample,
                                           PreferencePair)

IGNORE_INDEX = -100


def assistant_suffix(tokenizer) -> str:
    """What the chat template writes after an assistant turn's text (e.g. "<|im_end|>\n").

    Responses are tokenized exactly as SFT tokenized its targets: text + this suffix, apart
    from the prompt, so DPO scores the end-of-turn token the model learned to emit.
    """
    marker = "RESPONSE-MARKER"
    prompt = render_prompt(tokenizer, "question")
    conversation = render_conversation(tokenizer, "question", marker)
    tail = conversation[len(prompt):]
    if not conversation.startswith(prompt) or not tail.startswith(marker):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return tail[len(marker):]


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_len: int) -> Tuple[List[PreferenceExample], Dict[str, int]]:
    """Token ids of prompt and both responses; pairs over ``max_len`` are dropped and counted.

    max_len bounds prompt + the longer response: truncating would cut the answer off a path.
    """
    suffix = assistant_suffix(tokenizer)
    kept, dropped = [], Counter()
    for pair in pairs:
        prompt_ids = tuple(tokenizer(pair.prompt, add_special_tokens=False)["input_ids"])
        chosen_ids = tuple(tokenizer(pair.chosen + suffix, add_special_tokens=False)["input_ids"])
        rejected_ids = tuple(tokenizer(pair.rejected + suffix, add_special_tokens=False)["input_ids"])
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_len:
            dropped["too_long"] += 1
            continue
        kept.append(PreferenceExample(pair.uid, prompt_ids, chosen_ids, rejected_ids))
    return kept, dict(dropped)


def collate_sequences(sequences: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]], pad_token_id: int) -> SFTBatch:
    """(prompt ids, response ids) per row, right-padded to one width; labels on the response tokens
    (the same record as an SFT micro-batch: the reference pass runs it the same way)."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response)
        labels[row, len(prompt):n] = torch.tensor(response)
        attention_mask[row, :n] = 1
    return SFTBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def collate_pairs(examples: Sequence[PreferenceExample], pad_token_id: int) -> PreferenceBatch:
    """Chosen sequences first, then rejected, right-padded to one width."""
    sequences = [(ex.prompt_ids, ex.chosen_ids) for ex in examples] + [(ex.prompt_ids, ex.rejected_ids) for ex in examples]
    rows = collate_sequences(sequences, pad_token_id)
    return PreferenceBatch(uids=tuple(ex.uid for ex in examples), input_ids=rows.input_ids,
                           attention_mask=rows.attention_mask, labels=rows.labels)


TokenIds = Tuple[int, ...]


@dataclass
class _Segment:
    """One prompt with one or two responses, laid out as ``PackedRows`` lays a segment out."""

    input_ids: List[int]
    position_ids: torch.Tensor  # [n]
    mask: torch.Tensor  # [n, n] bool
    predictors: List[torch.Tensor]  # per response: [len] indices in the segment of the states predicting it
    responses: List[TokenIds]


def _segment(prompt: TokenIds, responses: Sequence[TokenIds], what: str) -> _Segment:
    if not prompt or not all(responses):
        raise ValueError(f"{what}: packing needs a prompt and non-empty responses")
    p, first = len(prompt), len(responses[0])
    n = p + sum(len(r) for r in responses)
    position_ids = torch.cat([torch.arange(p + first)] + [torch.arange(p, p + len(r)) for r in responses[1:]])
    mask = torch.ones((n, n), dtype=torch.bool).tril_()
    predictors = [torch.arange(p - 1, p + first - 1)]
    if len(responses) == 2:
        mask[p + first:, p:p + first] = False  # the second response does not see the first
        second = len(responses[1])
        predictors.append(torch.cat([torch.tensor([p - 1]), torch.arange(p + first, p + first + second - 1)]))
    return _Segment(list(prompt) + [t for r in responses for t in r], position_ids, mask, predictors, list(responses))


def _pack(segments: Sequence[_Segment], order: Sequence[Tuple[int, int]], one_row: bool, pad_token_id: int) -> dict:
    """``PackedRows`` fields of ``segments``, one row each or all in one row; sequence s of the result
    is response ``order[s] = (segment, response)``."""
    lengths = [len(seg.input_ids) for seg in segments]
    rows, width = (1, sum(lengths)) if one_row else (len(segments), max(lengths))
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    attention_mask = torch.zeros((rows, 1, width, width), dtype=torch.bool)
    starts = []  # flat index of each segment's first token
    for i, (seg, n) in enumerate(zip(segments, lengths)):
        row, col = (0, sum(lengths[:i])) if one_row else (i, 0)
        input_ids[row, col:col + n] = torch.tensor(seg.input_ids)
        position_ids[row, col:col + n] = seg.position_ids
        attention_mask[row, 0, col:col + n, col:col + n] = seg.mask
        if not one_row:
            pad = torch.arange(n, width)
            attention_mask[row, 0, pad, pad] = True
        starts.append(row * width + col)
    span = max(len(segments[i].responses[j]) for i, j in order)
    positions = torch.zeros((len(order), span), dtype=torch.long)
    targets = torch.full((len(order), span), IGNORE_INDEX, dtype=torch.long)
    for s, (i, j) in enumerate(order):
        response = segments[i].responses[j]
        positions[s, :len(response)] = starts[i] + segments[i].predictors[j]
        targets[s, :len(response)] = torch.tensor(response)
    spans = segment_spans(lengths) if one_row and len(segments) > 1 else ()
    return dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, positions=positions,
                targets=targets, segments=spans)


def collate_packed_pairs(examples: Sequence[PreferenceExample], pad_token_id: int,
                         one_row: bool = False) -> PackedPreferenceBatch:
    """Each pair one segment, prompt + chosen + rejected, with the mask and positions that make it compute
    exactly what two separate sequences would (``PackedPreferenceBatch``). The prompt's forward
    (and backward) runs once instead of twice: prefix sharing, as in Wang et al. 2024,
    "Accelerating Direct Preference Optimization with Prefix Sharing" (arXiv:2410.20305).
    One row per pair, right-padded; or (``one_row``) all pairs side by side in one row, no padding,
    for ``models/segments.py``'s per-segment attention: every matmul runs over all the pairs' tokens."""
    segments = [_segment(ex.prompt_ids, (ex.chosen_ids, ex.rejected_ids), f"pair {ex.uid}") for ex in examples]
    order = [(i, 0) for i in range(len(examples))] + [(i, 1) for i in range(len(examples))]
    return PackedPreferenceBatch(**_pack(segments, order, one_row, pad_token_id),
                                 uids=tuple(ex.uid for ex in examples),
                                 unpacked_tokens=sum(ex.num_tokens for ex in examples))


def collate_packed_sequences(groups: Sequence[Tuple[TokenIds, Sequence[TokenIds]]], pad_token_id: int) -> PackedRows:
    """(prompt, one or two responses) per segment, all in one row (``PackedRows``): a reference pass's
    sequences. Sequence order: each segment's responses in turn."""
    segments = [_segment(prompt, responses, f"sequence group {g}") for g, (prompt, responses) in enumerate(groups)]
    order = [(i, j) for i, seg in enumerate(segments) for j in range(len(seg.responses))]
    return PackedRows(**_pack(segments, order, True, pad_token_id))


@dataclass
class RoundPlan:
    """How a round's pairs are split: [epoch x step][rank][accumulation][micro-batch] examples."""

    steps: int
    global_batch: int
    unused: int  # pairs left over after the last full global batch of each epoch
    shards: List[List[List[List[PreferenceExample]]]] = field(default_factory=list)  # [rank][step][accum] -> examples


def plan_round(examples: Sequence[PreferenceExample], world_size: int, micro_batch_size: int, grad_accum: int,
               epochs: int, seed: int) -> RoundPlan:
    """Shuffle each epoch (seeded), cut into full global batches, lay each out by rank and accumulation.

    Every rank gets the same number of steps and micro-batches of the same size (ZeRO-3 ranks
    must run the same collectives), so the remainder of each epoch is left out and counted.
    """
    global_batch = world_size * micro_batch_size * grad_accum
    per_epoch = len(examples) // global_batch
    shards: List[List[List[List[PreferenceExample]]]] = [[] for _ in range(world_size)]
    for epoch in range(epochs):
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for step in range(per_epoch):
            chunk = [examples[i] for i in order[step * global_batch:(step + 1) * global_batch]]
            for rank in range(world_size):
                accum = []
                for a in range(grad_accum):
                    start = (a * world_size + rank) * micro_batch_size
                    accum.append(chunk[start:start + micro_batch_size])
                shards[rank].append(accum)
    return RoundPlan(steps=per_epoch * epochs, global_batch=global_batch,
                     unused=(len(examples) - per_epoch * global_batch), shards=shards)
