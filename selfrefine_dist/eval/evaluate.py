"""Score a model on registered tasks: greedy chain-of-thought answers, checked like rewards.

Accuracy per task with a 95% bootstrap interval, and pooled over in-domain
tasks (those trained on) and out-of-domain tasks (the others), as the paper reports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.sft_dataset import render_prompt
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.eval.generation import generate_greedy
from selfrefine_dist.eval.stats import Accuracy, bootstrap_accuracy
from selfrefine_dist.rewards import check_answer


@dataclass
class EvalResult:
    label: str
    per_task: Dict[str, Accuracy]
    in_domain: Accuracy
    out_of_domain: Accuracy
    samples: List[dict]

    def as_dict(self) -> dict:
        return {"label": self.label, "per_task": {k: v.as_dict() for k, v in self.per_task.items()},
                "in_domain": self.in_domain.as_dict(), "out_of_domain": self.out_of_domain.as_dict()}


def score_completions(examples: Sequence[ReasoningExample], completions: Sequence[str]) -> List[dict]:
    rows = []
    for ex, text in zip(examples, completions):
        spec = get_task(ex.task)
        r = check_answer(text, ex.answer, spec.answer_type, ex.choices or None)
        rows.append({"uid": ex.uid, "task": ex.task, "gold": ex.answer, "extracted": r.extracted,
                     "correct": r.correct, "reason": r.reason, "completion": text})
    return rows


def summarize(label: str, rows: List[dict], train_tasks: Sequence[str], resamples: int = 1000) -> EvalResult:
    tasks = sorted({r["task"] for r in rows})
    per_task = {t: bootstrap_accuracy([r["correct"] for r in rows if r["task"] == t], resamples) for t in tasks}
    in_dom = bootstrap_accuracy([r["correct"] for r in rows if r["task"] in train_tasks], resamples)
    out_dom = bootstrap_accuracy([r["correct"] for r in rows if r["task"] not in train_tasks], resamples)
    return EvalResult(label, per_task, in_dom, out_dom, rows)


def evaluate_hf_model(label: str, model_path: str, examples: Sequence[ReasoningExample], train_tasks: Sequence[str],
                      max_new_tokens: int, batch_size: int, resamples: int = 1000, trust_remote_code: bool = False,
                      progress: bool = True) -> EvalResult:
    from selfrefine_dist.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_causal_lm(model_path, "fp32", trust_remote_code)
    prompts = [render_prompt(tokenizer, get_task(ex.task).user_prompt(ex, "cot")) for ex in examples]
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    return summarize(label, score_completions(examples, completions), train_tasks, resamples)


def write_result(result: EvalResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{result.label}.json").write_text(json.dumps(result.as_dict(), indent=2))
    with (out_dir / f"{result.label}_samples.jsonl").open("w") as f:
        for row in result.samples:
            f.write(json.dumps(row) + "\n")


def comparison_table(results: Sequence[EvalResult]) -> str:
    tasks = sorted({t for r in results for t in r.per_task})
    header = "| model | " + " | ".join(tasks) + " | in-domain | out-of-domain |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for r in results:
        cells = [str(r.per_task[t]) if t in r.per_task else "-" for t in tasks]
        lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {r.in_domain} | {r.out_of_domain} |")
    return "\n".join(lines)
