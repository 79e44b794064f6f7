"""A run's report, ``<run>/report.md`` with plots in ``<run>/report/``, built from the run's files alone.

    eval/<label>.json, eval/<label>_samples.jsonl  accuracy per stage; the paired sft -> last round change
    rounds/round_NN/summary.json                   sample pass rates, pairs kept and dropped, seconds per stage
    rounds/round_NN/dpo_metrics.jsonl              DPO rewards and accuracies per optimizer step
    metrics.jsonl                                  stage "timing" (seconds per pipeline stage), stage "sft" (loss)
    config.yaml                                    the trained-on tasks, which split in-domain from out-of-domain

A missing source leaves its section with one line saying so. Plots are drawn on bare matplotlib
``Figure`` objects (Agg canvas), so making a report touches no global pyplot state.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

ROUND_STAGES = ("sample", "pair", "reference_logps", "dpo", "export", "sync", "eval")


@dataclass(frozen=True)
class Difference:
    """Mean per-question change in accuracy (fractions) with its 95% bootstrap interval, over n questions."""

    mean: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 0 and (self.ci_low > 0 or self.ci_high < 0)


def paired_difference(before: Sequence[dict], after: Sequence[dict], resamples: int = 2000,
                      seed: int = 0) -> Difference:
    """Accuracy of ``after`` minus ``before`` on the questions both answered, matched by (uid, task).

    d_i = correct_after_i - correct_before_i in {-1, 0, 1}; the estimate is mean(d), the interval the 2.5/97.5
    percentiles of the means of ``resamples`` resamples of the questions. Resampling questions (not each run
    apart) keeps the pairing, so the interval is far narrower than the two accuracies' own intervals suggest.
    """
    first = {(r["uid"], r["task"]): float(bool(r["correct"])) for r in before}
    second = {(r["uid"], r["task"]): float(bool(r["correct"])) for r in after}
    keys = sorted(set(first) & set(second))  # a fixed order, so the seeded resamples do not depend on file order
    d = np.array([second[k] - first[k] for k in keys])
    if len(d) == 0:
        return Difference(float("nan"), float("nan"), float("nan"), 0)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(float(d.mean()), float(low), float(high), len(d))


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report.md`` and its PNG plots in ``<run_dir>/report/``; returns the markdown path."""
    run_dir = Path(run_dir)
    plots = run_dir / "report"
    plots.mkdir(parents=True, exist_ok=True)
    for old in plots.glob("*.png"):  # a plot whose source is gone must not survive from an earlier report
        old.unlink()
    evals = _read_evals(run_dir / "eval")
    summaries, histories = _read_rounds(run_dir / "rounds")
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    sections = [(_accuracy_section, evals, plots), (_change_section, evals, run_dir),
                (_rounds_section, summaries, plots), (_dpo_section, histories, plots),
                (_timing_section, metrics, summaries, plots), (_sft_section, metrics, plots)]
    parts = [f"# Report: {run_dir.name}"]
    for build, *args in sections:
        try:
            parts.append(build(*args))
        except Exception as e:  # noqa: BLE001 -- a malformed file must not cost the report of a finished run
            title = build.__name__.strip("_").replace("_section", "")
            parts.append(f"## {title}\n\nCould not build this section: {e!r}")
    path = run_dir / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def _parse(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # a blank line, or a file or line cut short by a run killed mid-write
        return None


def _read_jsonl(path: Path) -> List[dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return [row for row in map(_parse, lines) if isinstance(row, dict)]


def _read_json(path: Path) -> Optional[dict]:
    data = _parse(path.read_text()) if path.is_file() else None
    return data if isinstance(data, dict) else None


def _stage_order(label: str) -> tuple:
    m = re.fullmatch(r"round_(\d+)", label)
    if label in ("base", "sft"):
        return (0 if label == "base" else 1, 0, "")
    return (2, int(m[1]), "") if m else (3, 0, label)


def _read_evals(eval_dir: Path) -> Dict[str, dict]:
    """Finished evaluations by label, in stage order: base, sft, round_1, round_2, ..., then any others."""
    found = {data.get("label", p.stem): data for p in eval_dir.glob("*.json") if (data := _read_json(p))}
    return {k: found[k] for k in sorted(found, key=_stage_order)}


def _read_rounds(rounds_dir: Path):
    """Round summaries and DPO step histories, each keyed by round number, in round order."""
    dirs = sorted((int(d.name[6:]), d) for d in rounds_dir.glob("round_*") if re.fullmatch(r"round_\d+", d.name))
    summaries = {r: s for r, d in dirs if (s := _read_json(d / "summary.json"))}
    histories = {r: h for r, d in dirs if (h := _read_jsonl(d / "dpo_metrics.jsonl"))}
    return summaries, histories


def _train_tasks(run_dir: Path) -> Optional[set]:
    """The tasks trained on, from the resolved ``config.yaml``; None when it cannot be read."""
    import yaml

    try:
        return {d["task"] for d in yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _acc(a: Optional[dict]) -> str:
    if not a or not a.get("total"):
        return "-"
    return f"{100 * a['accuracy']:.1f} [{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}] (n={a['total']})"


def _figure(ncols: int = 1, width: float = 6.0, height: float = 3.8):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Figure, plots: Path, name: str) -> str:
    fig.savefig(plots / f"{name}.png", dpi=100)
    return f"![{name}](report/{name}.png)"


def _accuracy_section(evals: Dict[str, dict], plots: Path) -> str:
    if not evals:
        return "## Accuracy\n\nNo evaluation results (eval/<label>.json) found."
    stages, tasks = list(evals), sorted({t for e in evals.values() for t in e.get("per_task", {})})
    pooled = {"in-domain": [e.get("in_domain") for e in evals.values()],
              "out-of-domain": [e.get("out_of_domain") for e in evals.values()]}
    per_task = {t: [e.get("per_task", {}).get(t) for e in evals.values()] for t in tasks}
    fig, axes = _figure(2)
    for ax, series, title in [(axes[0], pooled, "pooled"), (axes[1], per_task, "per task")]:
        for i, (name, accs) in enumerate(series.items()):
            pts = [(j, a) for j, a in enumerate(accs) if a and a.get("total")]
            if not pts:
                continue
            x = np.array([j for j, _ in pts]) + 0.08 * (i - (len(series) - 1) / 2)  # side by side, not on top
            y, low, high = (np.array([100 * a[k] for _, a in pts]) for k in ("accuracy", "ci_low", "ci_high"))
            ax.errorbar(x, y, yerr=np.vstack([y - low, high - y]), fmt="o-", capsize=3, label=name)
        ax.set(xticks=range(len(stages)), xticklabels=stages, ylabel="accuracy (%)", title=f"accuracy, 95% CI, {title}")
        ax.legend(fontsize="small")
    columns = {**pooled, **per_task}
    table = _table(["stage", *columns], [[s, *(_acc(c[j]) for c in columns.values())] for j, s in enumerate(stages)])
    return f"## Accuracy\n\nAccuracy (%) with 95% bootstrap interval.\n\n{_save(fig, plots, 'accuracy')}\n\n{table}"


def _change_section(evals: Dict[str, dict], run_dir: Path) -> str:
    rounds = [s for s in evals if _stage_order(s)[0] == 2]
    if "sft" not in evals or not rounds:
        return "## Change from sft to the last round\n\nNeeds the sft evaluation and at least one round's; not found."
    last = rounds[-1]
    before, after = (_read_jsonl(run_dir / "eval" / f"{s}_samples.jsonl") for s in ("sft", last))
    if not before or not after:
        return f"## Change from sft to {last}\n\nPer-question outcomes (eval/<label>_samples.jsonl) not found."
    train = _train_tasks(run_dir)
    tasks = sorted({r["task"] for r in before + after})
    pooled = ([("in-domain", train), ("out-of-domain", set(tasks) - train)] if train is not None
              else [("all tasks", set(tasks))])
    scopes = pooled + [(t, {t}) for t in tasks]
    lines, rows = [], []
    for i, (name, keep) in enumerate(scopes):
        diff = paired_difference([r for r in before if r["task"] in keep], [r for r in after if r["task"] in keep])
        if diff.n == 0:
            continue
        ci = f"{100 * diff.mean:+.1f} [{100 * diff.ci_low:+.1f}, {100 * diff.ci_high:+.1f}]"
        rows.append([name, diff.n, ci, "yes" if diff.excludes_zero else "no"])
        if i < len(pooled):  # the headline: pooled scopes in words, every scope in the table
            lines.append(f"- **{name}**: {ci} points (n={diff.n}); the interval "
                         + ("excludes 0." if diff.excludes_zero else "includes 0: no clear change."))
    table = _table(["scope", "questions", "change (points) [95% CI]", "interval excludes 0"], rows)
    note = "Paired bootstrap over the questions both evaluations answered (matched by uid and task)."
    return f"## Change from sft to {last}\n\n{note}\n\n" + "\n".join(lines) + f"\n\n{table}"


def _rounds_section(summaries: Dict[int, dict], plots: Path) -> str:
    if not summaries:
        return "## Rounds\n\nNo finished rounds (rounds/round_NN/summary.json) found."
    rs, all_keys = sorted(summaries), sorted({k for s in summaries.values() for k in s})
    pass_keys = [k for k in all_keys if k.startswith("pass_at_")]
    question_drops = [k for k in all_keys if k.startswith("dropped_") and not k.startswith("dropped_pairs_")]
    pair_drops = [k for k in all_keys if k.startswith("dropped_pairs_")]
    get = lambda key: np.array([summaries[r].get(key, 0) for r in rs], dtype=float)  # noqa: E731
    fig, axes = _figure(3, width=4.5)
    for key in ["sample_accuracy", *pass_keys]:
        axes[0].plot(rs, 100 * get(key), "o-", label=key)
    axes[0].set(xticks=rs, xlabel="round", ylabel="%", title="sampled paths")
    # Every candidate pair is accounted for: trained on, too long, left over by batching, or beyond the cap.
    trained = get("pairs_kept") - sum((get(k) for k in pair_drops), np.zeros(len(rs))) - get("pairs_unused")
    pair_parts = [("trained", trained)] + [(k, get(k)) for k in [*pair_drops, "pairs_unused", "pairs_capped"]]
    question_parts = [(k, get(k)) for k in question_drops]
    for ax, parts, title in [(axes[1], pair_parts, "candidate pairs"),
                             (axes[2], question_parts, "questions without a pair")]:
        bottom = np.zeros(len(rs))
        for name, values in parts:
            ax.bar(rs, values, bottom=bottom, label=name)
            bottom += values
        ax.set(xticks=rs, xlabel="round", title=title)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # a round summary may lack a whole group of keys
            ax.legend(fontsize="small")
    cols = ["sample_accuracy", *pass_keys, "pairs_kept", *pair_drops, "pairs_capped", "pairs_unused", *question_drops]
    table = _table(["round", *cols], [[r, *(_num(summaries[r].get(c)) for c in cols)] for r in rs])
    note = "`dropped_pairs_*`, `pairs_*` count pairs; other `dropped_*` count questions that gave no pair."
    return f"## Rounds\n\n{_save(fig, plots, 'rounds')}\n\n{note}\n\n{table}"


def _dpo_section(histories: Dict[int, List[dict]], plots: Path) -> str:
    if not histories:
        return "## DPO\n\nNo DPO step metrics (rounds/round_NN/dpo_metrics.jsonl) found."
    fig, axes = _figure(2)
    start = 1  # one continuous step axis across rounds; each round its own segment, its start marked
    for r, h in histories.items():
        x = np.arange(start, start + len(h))
        for ax, keys in zip(axes, [("rewards/margins", "rewards/chosen", "rewards/rejected"), ("rewards/accuracies",)]):
            for i, key in enumerate(keys):
                ax.plot(x, [s.get(key, np.nan) for s in h], color=f"C{i}", label=key if start == 1 else None)
            ax.axvline(start - 0.5, color="grey", ls=":", lw=1)
            ax.text(start - 0.5, 1, f" round {r}", transform=ax.get_xaxis_transform(), va="top", fontsize="small")
        start += len(h)
    for ax, title in zip(axes, ("implicit rewards", "reward accuracy")):
        ax.set(xlabel="optimizer step", title=title)
        ax.legend(fontsize="small")
    rows = [[r, len(h), *(f"{_num(h[0].get(k))} -> {_num(h[-1].get(k))}" for k in
                          ("rewards/margins", "rewards/accuracies", "loss"))] for r, h in histories.items()]
    table = _table(["round", "steps", *(f"{k} (first -> last)" for k in ("margin", "accuracy", "loss"))], rows)
    return f"## DPO\n\n{_save(fig, plots, 'dpo')}\n\n{table}"


def _timing_section(metrics: List[dict], summaries: Dict[int, dict], plots: Path) -> str:
    timing = [m for m in metrics if m.get("stage") == "timing"]
    bars = {"pipeline": {k[:-2]: v for k, v in timing[-1].items() if k.endswith("_s")}} if timing else {}
    for r, s in summaries.items():
        t = bars[f"round {r}"] = {k: s[f"{k}_s"] for k in ROUND_STAGES if f"{k}_s" in s}
        if "dpo" in t:  # reference log-probs are computed inside the DPO stage's time
            t["dpo"] -= t.get("reference_logps", 0.0)
    if not bars:
        return "## Time per stage\n\nNo timing record in metrics.jsonl and no round summaries found."
    names = list(dict.fromkeys(k for t in bars.values() for k in t))
    colors = {k: colormaps["tab20"](i % 20) for i, k in enumerate(names)}
    fig, (ax,) = _figure(1, width=9, height=max(3.5, 1.2 + 0.5 * len(bars)))  # tall enough for the legend
    for y, t in enumerate(bars.values()):
        ax.barh(y, list(t.values()), left=np.cumsum([0, *t.values()])[:-1], color=[colors[k] for k in t])
    ax.set(yticks=range(len(bars)), yticklabels=list(bars), xlabel="seconds", title="time per stage")
    ax.invert_yaxis()
    ax.legend(handles=[Patch(color=colors[k], label=k) for k in names], fontsize="small", loc="upper left",
              bbox_to_anchor=(1.01, 1))
    pipeline = bars.pop("pipeline", {})
    text = [f"## Time per stage\n\n{_save(fig, plots, 'timing')}", _table(["stage", "seconds", "share"], [
        [k, f"{v:.1f}", f"{100 * v / sum(pipeline.values()):.0f}%"] for k, v in pipeline.items()])
        if pipeline else "No timing record (stage \"timing\") in metrics.jsonl."]
    if bars:  # the rounds
        cols = list(dict.fromkeys(k for t in bars.values() for k in t))
        text.append(_table(["round", *(f"{c} (excl. reference)" if c == "dpo" else c for c in cols), "total"],
                           [[b[6:], *(f"{t.get(c, 0.0):.1f}" for c in cols), f"{sum(t.values()):.1f}"]
                            for b, t in bars.items()]))
    return "\n\n".join(text)


def _sft_section(metrics: List[dict], plots: Path) -> str:
    # A resumed run logs some steps twice; the later record is the one the model continued from.
    by_step = {m["step"]: m["loss"] for m in metrics if m.get("stage") == "sft" and m.get("step") is not None
               and isinstance(m.get("loss"), (int, float))}
    if not by_step:
        return "## SFT\n\nNo SFT loss records (stage \"sft\") in metrics.jsonl."
    steps = sorted(by_step)
    fig, (ax,) = _figure(1)
    ax.plot(steps, [by_step[s] for s in steps])
    ax.set(xlabel="step", ylabel="loss", title="SFT loss")
    summary = (f"{len(steps)} logged steps; loss {by_step[steps[0]]:.3f} at step {steps[0]} -> "
               f"{by_step[steps[-1]]:.3f} at step {steps[-1]} (min {min(by_step.values()):.3f}).")
    return f"## SFT\n\n{_save(fig, plots, 'sft_loss')}\n\n{summary}"
