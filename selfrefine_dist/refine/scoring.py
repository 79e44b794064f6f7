"""Rewards for sampled paths: the same answer checking as evaluation, plus round statistics."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import comb
from typing import Dict, List, Mapping, Sequence

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.refine.records import ScoredPath
from selfrefine_dist.rewards import check_answer


def score_paths(examples: Sequence[ReasoningExample], texts: Mapping[str, Sequence], style: str,
                model_version: int) -> List[ScoredPath]:
    """Score every sampled text of every question.

    texts: uid -> the GeneratedTexts sampled for that question (objects with ``text``,
        ``num_tokens`` and ``finish_reason``). A question with no entry raises: the sampler
        pool promises every question back exactly once.
    """
    scored: List[ScoredPath] = []
    for ex in examples:
        if ex.uid not in texts:
            raise KeyError(f"no samples came back for question {ex.uid}")
        spec = get_task(ex.task)
        for i, gen in enumerate(texts[ex.uid]):
            verdict = check_answer(gen.text, ex.answer, spec.answer_type, ex.choices or None)
            scored.append(ScoredPath(uid=ex.uid, task=ex.task, style=style, index=i, text=gen.text,
                                     num_tokens=gen.num_tokens, finish_reason=gen.finish_reason,
                                     correct=verdict.correct, extracted=verdict.extracted, reason=verdict.reason,
                                     model_version=model_version))
    return scored


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class SampleStats:
    """Per round: how often sampled paths were right, and why the others were not."""

    questions: int = 0
    paths: int = 0
    correct: int = 0
    pass_at_k: float = 0.0
    k: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)
    mean_tokens: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.paths if self.paths else 0.0

    def as_metrics(self) -> dict:
        out = {"sample_accuracy": self.accuracy, f"pass_at_{self.k}": self.pass_at_k, "questions": self.questions,
               "paths": self.paths, "mean_path_tokens": self.mean_tokens}
        out.update({f"paths_{reason}": n for reason, n in self.reasons.items()})
        return out


def sample_stats(paths: Sequence[ScoredPath]) -> SampleStats:
    by_question: Dict[str, List[ScoredPath]] = defaultdict(list)
    for p in paths:
        by_question[p.uid].append(p)
    if not paths:
        return SampleStats()
    k = min(len(v) for v in by_question.values())
    passes = [pass_at_k(len(v), sum(p.correct for p in v), k) for v in by_question.values()]
    return SampleStats(questions=len(by_question), paths=len(paths), correct=sum(p.correct for p in paths),
                       pass_at_k=sum(passes) / len(passes), k=k, reasons=dict(Counter(p.reason for p in paths)),
                       mean_tokens=sum(p.num_tokens for p in paths) / len(paths))
