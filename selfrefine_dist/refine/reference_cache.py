"""Reference log-probs per distinct sequence: each (prompt, response) runs through the reference once.

A round's pairs repeat sequences. Under ``correct_vs_incorrect`` with ``max_pairs_per_question`` > 1 one
sampled path sits in several pairs; under ``teacher_vs_incorrect`` the teacher's demonstration is the
chosen side of its question in every round. The reference pass computes each distinct sequence once
and looks the pairs' values up by sequence:

    cache = ReferenceCache()
    groups = cache.missing(examples)           # [SequenceGroup]: per prompt, the responses not yet known
    for batch, keys in reference_batches(groups, packed, pad, pairs_per_forward):
        cache.store(keys, summed_logps(reference, batch))      # [rows] -> one float per sequence key
    ref_chosen, ref_rejected = cache.pair_logps(micro_batch)  # [B], [B]

Under a frozen reference (``dpo.reference: sft``) a sequence's log-prob never changes: the learner keeps
its cache across rounds, and a round whose sequences are all known loads no reference at all. Under the
policy-as-reference the cache lives for one round. A learner that restarts (a resumed run) starts with
an empty cache and recomputes: the same values within float rounding (a sequence computed in another
batch runs through other kernel blockings).
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch

from selfrefine_dist.data.records import SFTBatch
from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_sequences
from selfrefine_dist.refine.records import PackedPreferenceBatch, PreferenceExample

TokenIds = Tuple[int, ...]


def sequence_key(prompt_ids: TokenIds, response_ids: TokenIds) -> bytes:
    """16-byte digest of one sequence: the prompt's length, then prompt and response token ids."""
    return hashlib.blake2b(array("q", (len(prompt_ids), *prompt_ids, *response_ids)).tobytes(),
                           digest_size=16).digest()


@dataclass
class SequenceGroup:
    """The responses of one prompt whose reference log-probs are still unknown (distinct, first-seen order)."""

    prompt_ids: TokenIds
    responses: List[TokenIds] = field(default_factory=list)


@dataclass
class ReferenceCache:
    """Summed reference log-prob of each sequence computed so far (``sequence_key`` -> float)."""

    logps: Dict[bytes, float] = field(default_factory=dict)

    def missing(self, examples: Sequence[PreferenceExample]) -> List[SequenceGroup]:
        """The examples' sequences not in the cache, each once, grouped by prompt (first-seen order)."""
        groups: Dict[TokenIds, SequenceGroup] = {}
        seen = set(self.logps)
        for ex in examples:
            for response in (ex.chosen_ids, ex.rejected_ids):
                key = sequence_key(ex.prompt_ids, response)
                if key not in seen:
                    seen.add(key)
                    groups.setdefault(ex.prompt_ids, SequenceGroup(ex.prompt_ids)).responses.append(response)
        return list(groups.values())

    def store(self, keys: Sequence[bytes], summed_logps: torch.Tensor) -> None:
        """Record ``summed_logps`` [N] as the log-probs of the sequences ``keys`` [N] (in row order)."""
        if len(keys) != summed_logps.numel():
            raise ValueError(f"{len(keys)} sequence keys for {summed_logps.numel()} log-probs")
        self.logps.update(zip(keys, summed_logps.float().tolist()))

    def pair_logps(self, examples: Sequence[PreferenceExample]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) float32 reference log-probs of the examples' responses."""
        chosen = [self.logps[sequence_key(ex.prompt_ids, ex.chosen_ids)] for ex in examples]
        rejected = [self.logps[sequence_key(ex.prompt_ids, ex.rejected_ids)] for ex in examples]
        return torch.tensor(chosen, dtype=torch.float32), torch.tensor(rejected, dtype=torch.float32)


ReferenceBatch = Union[PackedPreferenceBatch, SFTBatch]


def reference_batches(groups: Sequence[SequenceGroup], packed: bool, pad_token_id: int,
                      pairs_per_forward: int) -> Iterator[Tuple[ReferenceBatch, List[bytes]]]:
    """The unknown sequences as forward batches the size of the training's (``pairs_per_forward`` pairs),
    each with its sequences' keys in the order its summed log-probs come out (a packed batch: its
    first responses, then its second ones).

    Packed (``dpo.shared_prompt``): two responses of a prompt share a row (prompt + both, the mask of
    ``collate_packed_pairs``), so the prompt runs once for both; a prompt's odd response out runs alone,
    ``pairs_per_forward`` such rows a batch. Unpacked: one sequence per row, ``2 * pairs_per_forward``
    rows a batch. Single rows are sorted by length, so that a batch pads little.
    """
    rows = pairs_per_forward if packed else 2 * pairs_per_forward
    singles: List[Tuple[TokenIds, TokenIds]] = []
    twins: List[PreferenceExample] = []
    for group in groups:
        responses = group.responses
        cut = len(responses) - len(responses) % 2 if packed else 0
        twins += [PreferenceExample("", group.prompt_ids, responses[i], responses[i + 1]) for i in range(0, cut, 2)]
        singles += [(group.prompt_ids, response) for response in responses[cut:]]
    for i in range(0, len(twins), rows):
        part = twins[i:i + rows]
        keys = ([sequence_key(ex.prompt_ids, ex.chosen_ids) for ex in part]
                + [sequence_key(ex.prompt_ids, ex.rejected_ids) for ex in part])
        yield collate_packed_pairs(part, pad_token_id), keys
    singles.sort(key=lambda seq: len(seq[0]) + len(seq[1]))
    for i in range(0, len(singles), rows):
        part = singles[i:i + rows]
        yield collate_sequences(part, pad_token_id), [sequence_key(prompt, response) for prompt, response in part]
