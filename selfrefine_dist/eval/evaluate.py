"""Score a model on registered tasks: greedy chain-of-thought answers, checked like rewards.

Accuracy per task with a 95% bootstrap interval, and pooled over in-domain
tasks (those trained on) and out-of-domain tasks (the others), as the paper reports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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
    # task -> unbiased pass@K over K sampled answers per question (when asked for)
    pass_at_k: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"label": self.label, "per_task": {k: v.as_dict() for k, v in self.per_task.items()},
                "in_domain": self.in_domain.as_dict(), "out_of_domain": self.out_of_domain.as_dict(),
                "pass_at_k": self.pass_at_k}


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


def evaluate_with_pool(label: str, pool, tokenizer, examples: Sequence[ReasoningExample], train_tasks: Sequence[str],
                       max_new_tokens: int, resamples: int = 1000, pass_k: int = 0,
                       pass_k_temperature: float = 0.8, progress: bool = True) -> EvalResult:
    """Greedy answers from the sampler actors (whatever weights they hold now), scored like rewards;
    with ``pass_k`` > 0 also K sampled answers per question, reported as unbiased pass@K per task."""
    from selfrefine_dist.refine.scoring import pass_at_k
    from selfrefine_dist.sampling.records import GenerationRequest, SamplingSettings

    prompts = [render_prompt(tokenizer, get_task(ex.task).user_prompt(ex, "cot")) for ex in examples]
    requests = [GenerationRequest(f"{i}:{ex.uid}", p, 1) for i, (ex, p) in enumerate(zip(examples, prompts))]
    texts = pool.generate(requests, SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0),
                          progress=progress)
    result = summarize(label, score_completions(examples, [texts[r.key][0].text for r in requests]), train_tasks,
                       resamples)
    if pass_k > 0:
        sampled = pool.generate([GenerationRequest(r.key, r.prompt, pass_k) for r in requests],
                                SamplingSettings(pass_k_temperature, 1.0, max_new_tokens, seed=1), progress=progress)
        per_task: Dict[str, List[float]] = {}
        for ex, r in zip(examples, requests):
            rows = score_completions([ex] * pass_k, [g.text for g in sampled[r.key]])
            per_task.setdefault(ex.task, []).append(pass_at_k(pass_k, sum(row["correct"] for row in rows), pass_k))
        result.pass_at_k = {task: sum(v) / len(v) for task, v in per_task.items()}
    return result


def read_result(label: str, out_dir: Path, train_tasks: Optional[Sequence[str]] = None,
                resamples: int = 1000) -> EvalResult:
    """An evaluation written by ``write_result`` (a finished stage of an earlier run).

    train_tasks: the split into in-domain and out-of-domain; None: the ``train_tasks`` stored with the
    evaluation (files written before it was stored have none: then ``train_tasks`` must be given).
    """
    summary_file = Path(out_dir) / f"{label}.json"
    stored = json.loads(summary_file.read_text())
    if train_tasks is None:
        if stored.get("train_tasks") is None:
            raise ValueError(f"{summary_file}: no train_tasks stored (written by an older version); pass train_tasks")
        train_tasks = stored["train_tasks"]
    with (Path(out_dir) / f"{label}_samples.jsonl").open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    result = summarize(label, rows, train_tasks, resamples)
    result.pass_at_k = stored.get("pass_at_k", {})
    return result


def write_result(result: EvalResult, out_dir: Path, train_tasks: Optional[Sequence[str]] = None) -> None:
    """Samples first, summary last: the summary file marks a finished evaluation.

    train_tasks: the tasks trained on (which split in-domain from out-of-domain), stored in the summary as
    ``train_tasks`` so the evaluation can be compared on its own (``selfrefine compare``).
    """
    from selfrefine_dist.artifacts import write_json, write_jsonl  # whole files or none, never half

    out_dir = Path(out_dir)
    write_jsonl(out_dir / f"{result.label}_samples.jsonl", result.samples)
    summary = result.as_dict()
    if train_tasks is not None:
        summary["train_tasks"] = sorted(set(train_tasks))
    write_json(out_dir / f"{result.label}.json", summary)


def comparison_table(results: Sequence[EvalResult]) -> str:
    tasks = sorted({t for r in results for t in r.per_task})
    header = "| model | " + " | ".join(tasks) + " | in-domain | out-of-domain |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for r in results:
        cells = [str(r.per_task[t]) if t in r.per_task else "-" for t in tasks]
        lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {r.in_domain} | {r.out_of_domain} |")
    return "\n".join(lines)
