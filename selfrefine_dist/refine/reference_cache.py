"""Reference log-probs per distinct sequence: each (prompt, response) runs through the reference once.

A round's pairs repeat sequences. Under ``correct_vs_incorrect`` with ``max_pairs_per_question`` > 1 one
sampled path sits in several pairs; under ``teacher_vs_incorrect`` the teacher's demonstration is the
chosen side of its question in every round. The reference pass computes each distinct sequence once
and looks the pairs' values up by sequence:

    cache = ReferenceCache()
    groups = cache.missing(examples)           # [SequenceGroup]: per prompt, the responses not yet known
    for batch, keys in reference_batches(groups, packed, pad, pairs_per_forward, one_row):
        cache.store(keys, summed_logps(reference, batch))      # [rows] -> one float per sequence key
    ref_chosen, ref_rejected = cache.pair_logps(micro_batch)  # [B], [B]

Under a frozen reference (``dpo.reference: sft``) a sequence's log-prob never changes: the values are
kept across rounds, and a round whose sequences are all known loads no reference at all. Under the
policy-as-reference the cache lives for one round.

Kept values are a run artifact, not a process's memory: a sequence computed in another batch runs
through other kernel blockings and gets another float, so a restarted learner that recomputed would
train on other numbers than the run it resumes. The loop writes each round's new values to
``rounds/round_NN/reference_logps.json`` (``save_table``) and hands the learners the table of the
rounds before (``load_tables``): a resumed round's reference pass runs the same batches and its
losses equal the uninterrupted run's.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple, Union

import torch

from selfrefine_dist import artifacts
from selfrefine_dist.data.records import SFTBatch
from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_packed_sequences, collate_sequences
from selfrefine_dist.refine.records import PackedRows, PreferenceExample

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

    @classmethod
    def from_table(cls, table: Dict[str, float]) -> "ReferenceCache":
        """The cache of a table (``table``): hex sequence key -> summed log-prob."""
        return cls({bytes.fromhex(key): float(logp) for key, logp in table.items()})

    def table(self, keys: Iterable[bytes]) -> Dict[str, float]:
        """The values of ``keys`` as a table (hex key -> log-prob), for a file or another process."""
        return {key.hex(): self.logps[key] for key in keys}

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


ReferenceBatch = Union[PackedRows, SFTBatch]
# One-row batches (per-segment attention) hold up to this many tokens: a forward keeps one layer's
# activations at a time, and on a 2-core CPU a 1024-row matmul runs ~1.4x the rate of a 160-row one.
ROW_TOKENS = 1024


def reference_batches(groups: Sequence[SequenceGroup], packed: bool, pad_token_id: int, pairs_per_forward: int,
                      one_row: bool = False) -> Iterator[Tuple[ReferenceBatch, List[bytes]]]:
    """The unknown sequences as forward batches, each with its sequences' keys in the order its summed
    log-probs come out.

    Packed (``dpo.shared_prompt``): two responses of a prompt share a segment (prompt + both, the mask of
    ``collate_packed_pairs``), so the prompt runs once for both; a prompt's odd response out is a segment
    of its own. ``one_row`` (per-segment attention, ``models/segments.py``): segments side by side in
    rows of up to ``ROW_TOKENS`` tokens (``collate_packed_sequences``). Otherwise one segment per row,
    ``pairs_per_forward`` rows a batch, the size of the training's. Unpacked: one sequence per row,
    ``2 * pairs_per_forward`` rows a batch. Single rows are sorted by length, so that a batch pads little.
    """
    rows = pairs_per_forward if packed else 2 * pairs_per_forward
    singles: List[Tuple[TokenIds, TokenIds]] = []
    twins: List[PreferenceExample] = []
    for group in groups:
        responses = group.responses
        cut = len(responses) - len(responses) % 2 if packed else 0
        twins += [PreferenceExample("", group.prompt_ids, responses[i], responses[i + 1]) for i in range(0, cut, 2)]
        singles += [(group.prompt_ids, response) for response in responses[cut:]]
    if packed and one_row:
        yield from _one_row_batches([(ex.prompt_ids, (ex.chosen_ids, ex.rejected_ids)) for ex in twins]
                                    + [(prompt, (response,)) for prompt, response in singles], pad_token_id)
        return
    for i in range(0, len(twins), rows):
        part = twins[i:i + rows]
        keys = ([sequence_key(ex.prompt_ids, ex.chosen_ids) for ex in part]
                + [sequence_key(ex.prompt_ids, ex.rejected_ids) for ex in part])
        yield collate_packed_pairs(part, pad_token_id), keys
    singles.sort(key=lambda seq: len(seq[0]) + len(seq[1]))
    for i in range(0, len(singles), rows):
        part = singles[i:i + rows]
        yield collate_sequences(part, pad_token_id), [sequence_key(prompt, response) for prompt, response in part]


def _one_row_batches(segments: List[Tuple[TokenIds, Tuple[TokenIds, ...]]],
                     pad_token_id: int) -> Iterator[Tuple[PackedRows, List[bytes]]]:
    """Segments in order, as many to a row as fit in ``ROW_TOKENS`` (a longer one alone)."""
    row: List[Tuple[TokenIds, Tuple[TokenIds, ...]]] = []
    tokens = 0
    for segment in segments + [None]:
        n = 0 if segment is None else len(segment[0]) + sum(len(r) for r in segment[1])
        if row and (segment is None or tokens + n > ROW_TOKENS):
            keys = [sequence_key(prompt, response) for prompt, responses in row for response in responses]
            yield collate_packed_sequences(row, pad_token_id), keys
            row, tokens = [], 0
        if segment is not None:
            row.append(segment)
            tokens += n


def save_table(path: Path, table: Dict[str, float], reference: str, dtype: str) -> None:
    """Write ``table`` (hex key -> log-prob) as the values of reference model ``reference`` (its stage
    fingerprint) in ``dtype``."""
    artifacts.write_json(path, {"reference": reference, "dtype": dtype, "logps": table}, indent=0)


def load_tables(paths: Sequence[Path], reference: str, dtype: str) -> Dict[str, float]:
    """The union of the tables at ``paths`` written for ``reference`` in ``dtype`` (a missing file, or one
    of another reference, adds nothing: its sequences are computed again). A value in two tables is the
    earlier path's."""
    table: Dict[str, float] = {}
    for path in paths:
        if not path.is_file():
            continue
        saved = artifacts.read_json(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("logps"), dict):
            raise ValueError(f"{path}: not a table of reference log-probs (no 'logps' object)")
        if (saved.get("reference"), saved.get("dtype")) == (reference, dtype):
            for key, logp in saved["logps"].items():
                table.setdefault(key, logp)
    return table
