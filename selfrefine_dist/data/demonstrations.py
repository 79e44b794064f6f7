"""Keep teacher demonstrations whose final answer agrees with the gold answer.

A demonstration is a ``ReasoningExample.rationale``: the dataset's own (GSM8K's
answers carry one), a user file's ``rationale`` field, or what ``selfrefine
teach`` wrote. Each is checked with the same answer checker as the rewards;
the report says how many were kept and why the others were dropped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.rewards import check_answer


@dataclass
class DemonstrationReport:
    total: int = 0
    kept: int = 0
    # reason -> count: "no_rationale", and the checker's "wrong", "no_answer", "parse_failure", "timeout"
    dropped: Dict[str, int] = field(default_factory=dict)
    # a few dropped uids per reason, to look at
    dropped_examples: Dict[str, List[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "dropped_examples": dict(self.dropped_examples)}

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"demonstrations: kept {self.kept} of {self.total} (dropped: {reasons})"

    @classmethod
    def combine(cls, reports: Sequence["DemonstrationReport"], show_per_reason: int = 5) -> "DemonstrationReport":
        """The reports of several slices as one: counts added, the first dropped uids of each reason."""
        dropped: Counter = Counter()
        shown: Dict[str, List[str]] = {}
        for report in reports:
            dropped.update(report.dropped)
            for reason, uids in report.dropped_examples.items():
                bucket = shown.setdefault(reason, [])
                bucket += uids[: show_per_reason - len(bucket)]
        return cls(total=sum(r.total for r in reports), kept=sum(r.kept for r in reports), dropped=dict(dropped),
                   dropped_examples=shown)


def select_demonstrations(
    examples: Sequence[ReasoningExample], show_per_reason: int = 5
) -> Tuple[List[ReasoningExample], DemonstrationReport]:
    kept: List[ReasoningExample] = []
    dropped: Counter = Counter()
    shown: Dict[str, List[str]] = {}
    for ex in examples:
        if not ex.rationale:
            reason = "no_rationale"
        else:
            spec = get_task(ex.task)
            result = check_answer(ex.rationale, ex.answer, spec.answer_type, ex.choices or None)
            reason = "kept" if result.correct else result.reason
        if reason == "kept":
            kept.append(ex)
            continue
        dropped[reason] += 1
        bucket = shown.setdefault(reason, [])
        if len(bucket) < show_per_reason:
            bucket.append(ex.uid)
    report = DemonstrationReport(total=len(examples), kept=len(kept), dropped=dict(dropped), dropped_examples=shown)
    return kept, report


def demonstrations_path(run_dir: Path) -> Path:
    """Where ``selfrefine teach`` writes the teacher's checked demonstrations in a run directory."""
    return Path(run_dir) / "teach" / "demonstrations.jsonl"


def read_demonstrations(path: Path) -> List[ReasoningExample]:
    from selfrefine_dist.artifacts import read_jsonl

    rows = read_jsonl(path)
    return [ReasoningExample(**{**row, "choices": tuple(row.get("choices") or ())}) for row in rows]
