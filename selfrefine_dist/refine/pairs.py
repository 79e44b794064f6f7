"""Preference pairs from scored paths, by strategy, with every dropped question counted by reason.

Strategies (``refine.pair_strategy``):
    correct_vs_incorrect  a correct sampled CoT path over an incorrect one (same question).
    cot_vs_direct         a correct CoT path over the student's direct (no-CoT) answer,
                          both as answers to the CoT prompt: reasoning is preferred to guessing.
    teacher_vs_incorrect  the teacher's demonstration over an incorrect sampled path.

A question whose paths all score the same gives no pair (``all_correct`` / ``all_incorrect``):
a pair of two equally rewarded answers teaches nothing but noise. Identical texts are
removed before pairing; at most ``max_pairs_per_question`` pairs are kept per question, picked
by a seeded shuffle so that reruns build the same pairs.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import product
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.refine.records import PreferencePair, ScoredPath

STRATEGIES = ("correct_vs_incorrect", "cot_vs_direct", "teacher_vs_incorrect")


@dataclass
class PairReport:
    questions: int = 0
    pairs: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)  # questions, by reason
    capped: int = 0  # candidate pairs beyond max_pairs_per_question
    duplicates: int = 0  # repeated texts removed before pairing

    def as_metrics(self) -> dict:
        out = {"pair_questions": self.questions, "pairs_kept": self.pairs, "pairs_capped": self.capped,
               "duplicate_paths": self.duplicates}
        out.update({f"dropped_{reason}": n for reason, n in sorted(self.dropped.items())})
        return out


def _unique_texts(paths: Sequence[ScoredPath]) -> Tuple[List[str], int]:
    seen, out = set(), []
    for p in paths:
        if p.text.strip() and p.text not in seen:
            seen.add(p.text)
            out.append(p.text)
    return out, len(paths) - len(out)


def build_pairs(
    examples: Sequence[ReasoningExample],
    prompts: Mapping[str, str],
    cot_paths: Sequence[ScoredPath],
    strategy: str,
    max_pairs_per_question: int,
    seed: int,
    direct_paths: Sequence[ScoredPath] = (),
    demonstrations: Optional[Mapping[str, str]] = None,
) -> Tuple[List[PreferencePair], PairReport]:
    """Pairs for every question of ``examples``, in question order.

    prompts: uid -> the chat-rendered CoT prompt (the prompt every pair answers).
    cot_paths / direct_paths: scored samples (direct ones only for ``cot_vs_direct``).
    demonstrations: uid -> teacher response text (``teacher_vs_incorrect`` only).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pair strategy must be one of {STRATEGIES}, got {strategy!r}")
    cot_by_uid: Dict[str, List[ScoredPath]] = defaultdict(list)
    for p in cot_paths:
        cot_by_uid[p.uid].append(p)
    direct_by_uid: Dict[str, List[ScoredPath]] = defaultdict(list)
    for p in direct_paths:
        direct_by_uid[p.uid].append(p)

    pairs: List[PreferencePair] = []
    dropped: Counter = Counter()
    report = PairReport(questions=len(examples))
    for ex in examples:
        paths = cot_by_uid.get(ex.uid, [])
        correct, dup_c = _unique_texts([p for p in paths if p.correct])
        incorrect, dup_i = _unique_texts([p for p in paths if not p.correct])
        report.duplicates += dup_c + dup_i
        if strategy == "correct_vs_incorrect":
            if not paths:
                dropped["no_samples"] += 1
                continue
            if not correct:
                dropped["all_incorrect"] += 1
                continue
            if not incorrect:
                dropped["all_correct"] += 1
                continue
            candidates = list(product(correct, incorrect))
            sources = ("cot_correct", "cot_incorrect")
        elif strategy == "cot_vs_direct":
            direct, dup_d = _unique_texts(direct_by_uid.get(ex.uid, []))
            report.duplicates += dup_d
            if not correct:
                dropped["no_correct_cot"] += 1
                continue
            if not direct:
                dropped["no_direct_answer"] += 1
                continue
            candidates = [(c, d) for c, d in product(correct, direct) if c != d]
            sources = ("cot_correct", "direct")
        else:  # teacher_vs_incorrect
            demo = (demonstrations or {}).get(ex.uid)
            if not demo:
                dropped["no_demonstration"] += 1
                continue
            if not incorrect:
                dropped["all_correct" if paths else "no_samples"] += 1
                continue
            candidates = [(demo, i) for i in incorrect if i != demo]
            sources = ("teacher", "cot_incorrect")
        rng = random.Random(f"{seed}:{ex.uid}")
        rng.shuffle(candidates)
        kept = _spread(candidates, max_pairs_per_question)
        report.capped += len(candidates) - len(kept)
        pairs.extend(PreferencePair(uid=ex.uid, task=ex.task, prompt=prompts[ex.uid], chosen=c, rejected=r,
                                    chosen_source=sources[0], rejected_source=sources[1]) for c, r in kept)
    report.pairs = len(pairs)
    report.dropped = dict(dropped)
    return pairs, report


def _spread(candidates: List[Tuple[str, str]], limit: int) -> List[Tuple[str, str]]:
    """Up to ``limit`` pairs, preferring ones whose chosen and rejected texts were not used yet."""
    kept, used_c, used_r = [], set(), set()
    for c, r in candidates:  # first pass: fresh texts on both sides
        if len(kept) < limit and c not in used_c and r not in used_r:
            kept.append((c, r))
            used_c.add(c)
            used_r.add(r)
    for pair in candidates:  # then fill up with the rest, in shuffled order
        if len(kept) >= limit:
            break
        if pair not in kept:
            kept.append(pair)
    return kept
