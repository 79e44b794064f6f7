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
from selfrefine_dist.refine.records import PackedPreferenceBatch, PreferenceBatch, PreferenceExample, PreferencePair

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


def collate_packed_pairs(examples: Sequence[PreferenceExample], pad_token_id: int) -> PackedPreferenceBatch:
    """One row per pair, prompt + chosen + rejected, with the mask and positions that make it compute
    exactly what two separate sequences would (``PackedPreferenceBatch``). The prompt's forward
    (and backward) runs once instead of twice: prefix sharing, as in Wang et al. 2024,
    "Accelerating Direct Preference Optimization with Prefix Sharing" (arXiv:2410.20305)."""
    lengths = [len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples]
    width = max(lengths)
    span = max(max(len(ex.chosen_ids), len(ex.rejected_ids)) for ex in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    attention_mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    positions = torch.zeros((2 * b, span), dtype=torch.long)
    targets = torch.full((2 * b, span), IGNORE_INDEX, dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        p, c, r = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
        if p == 0 or c == 0 or r == 0:
            raise ValueError(f"pair {ex.uid}: packing needs a prompt and both responses non-empty")
        input_ids[row, :n] = torch.tensor(ex.prompt_ids + ex.chosen_ids + ex.rejected_ids)
        position_ids[row, :p + c] = torch.arange(p + c)
        position_ids[row, p + c:n] = torch.arange(p, p + r)
        mask = torch.ones((n, n), dtype=torch.bool).tril_()
        mask[p + c:, p:p + c] = False  # rejected tokens do not see the chosen response
        attention_mask[row, 0, :n, :n] = mask
        pad = torch.arange(n, width)
        attention_mask[row, 0, pad, pad] = True
        positions[row, :c] = torch.arange(p - 1, p + c - 1)
        positions[b + row, 0] = p - 1
        positions[b + row, 1:r] = torch.arange(p + c, p + c + r - 1)
        targets[row, :c] = torch.tensor(ex.chosen_ids)
        targets[b + row, :r] = torch.tensor(ex.rejected_ids)
    return PackedPreferenceBatch(uids=tuple(ex.uid for ex in examples), input_ids=input_ids,
                                 position_ids=position_ids, attention_mask=attention_mask, positions=positions,
                                 targets=targets, unpacked_tokens=sum(ex.num_tokens for ex in examples))


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
