"""Rewards for sampled paths: the same answer checking as evaluation, plus round statistics."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import comb
from typing import Dict, List, Mapping, Sequence

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.refine.records import ScoredPath
from selfrefine_dist.rewards import check_answer, step_checker


REWARDS = ("outcome", "step_checked")
# Verdicts that mean no final answer could be read as a value: none was stated, what was stated
# is no number or option (or is cut, too long, ambiguous), or math-verify ran out of time on it.
UNREADABLE_REASONS = ("no_answer", "parse_failure", "timeout")


def score_paths(examples: Sequence[ReasoningExample], texts: Mapping[str, Sequence], style: str,
                model_version: int, reward: str = "outcome") -> List[ScoredPath]:
    """Score every sampled text of every question.

    texts: uid -> the GeneratedTexts sampled for that question (objects with ``text``,
        ``num_tokens`` and ``finish_reason``). A question with no entry raises: the sampler
        pool promises every question back exactly once.
    reward: "outcome" (the final answer decides) or "step_checked" (for CoT paths of a task with
        a step checker, the steps must check out too: a right answer reached through a wrong
        step scores correct=False, reason="wrong_step"). ``steps_ok`` is filled for every CoT
        path of such a task under either reward, so that lucky paths can be counted.
    """
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; expected one of {REWARDS}")
    scored: List[ScoredPath] = []
    for ex in examples:
        if ex.uid not in texts:
            raise KeyError(f"no samples came back for question {ex.uid}")
        spec = get_task(ex.task)
        check_steps = step_checker(ex.task) if style == "cot" else None
        for i, gen in enumerate(texts[ex.uid]):
            verdict = check_answer(gen.text, ex.answer, spec.answer_type, ex.choices or None)
            steps_ok = check_steps(gen.text, ex.answer).ok if check_steps else None
            correct, reason = verdict.correct, verdict.reason
            if reward == "step_checked" and correct and steps_ok is False:
                correct, reason = False, "wrong_step"
            scored.append(ScoredPath(uid=ex.uid, task=ex.task, style=style, index=i, text=gen.text,
                                     num_tokens=gen.num_tokens, finish_reason=gen.finish_reason,
                                     correct=correct, extracted=verdict.extracted, reason=reason,
                                     model_version=model_version, steps_ok=steps_ok))
    return scored


def answer_correct(path: ScoredPath) -> bool:
    """Whether the path's final answer is the gold, whatever the reward: under "step_checked" a
    right answer with a wrong step is kept apart by its reason "wrong_step"."""
    return path.correct or path.reason == "wrong_step"


def is_lucky(path: ScoredPath) -> bool:
    """A right final answer reached through steps that do not check out."""
    return answer_correct(path) and path.steps_ok is False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class SampleStats:
    """Per round: how often sampled paths were right, and why the others were not.

    correct: paths the reward counts as correct. answer_correct: paths whose final answer is the
    gold (the same as ``correct`` under the "outcome" reward). lucky: of those, the paths whose
    steps do not check out. unreadable: paths with a reason in ``UNREADABLE_REASONS``.
    """

    questions: int = 0
    paths: int = 0
    correct: int = 0
    pass_at_k: float = 0.0
    k: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)
    mean_tokens: float = 0.0
    mean_chars: float = 0.0
    answer_correct: int = 0
    lucky: int = 0
    unreadable: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.paths if self.paths else 0.0

    def as_metrics(self) -> dict:
        """sample_accuracy, pass_at_K, questions, paths, mean_path_tokens, mean_path_chars,
        no_answer_rate (unreadable / paths), lucky_paths, lucky_share (lucky / answer_correct, 0
        when no answer was right), and paths_<reason> for each reason seen."""
        out = {"sample_accuracy": self.accuracy, f"pass_at_{self.k}": self.pass_at_k, "questions": self.questions,
               "paths": self.paths, "mean_path_tokens": self.mean_tokens, "mean_path_chars": self.mean_chars,
               "no_answer_rate": self.unreadable / self.paths if self.paths else 0.0,
               "lucky_paths": self.lucky,
               "lucky_share": self.lucky / self.answer_correct if self.answer_correct else 0.0}
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
                       mean_tokens=sum(p.num_tokens for p in paths) / len(paths),
                       mean_chars=sum(len(p.text) for p in paths) / len(paths),
                       answer_correct=sum(answer_correct(p) for p in paths),
                       lucky=sum(is_lucky(p) for p in paths),
                       unreadable=sum(p.reason in UNREADABLE_REASONS for p in paths))
