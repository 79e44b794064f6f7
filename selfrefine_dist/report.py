"""A run's report, ``<run>/report.md`` with plots in ``<run>/report/``, built from the run's files alone.

    eval/<label>.json, eval/<label>_samples.jsonl  accuracy per stage; the paired sft -> final model change
    final.json                                     the final model ("label", "round", "reason": best on validation
                                                   or the last round); the change is measured to it
    validation/sft_samples.jsonl                   sft on the validation questions, round 1's point of comparison
    rounds/round_NN/summary.json                   sample pass rates, pairs kept and dropped, probe and validation
                                                   accuracy, seconds per stage
    rounds/round_NN/dpo_metrics.jsonl              DPO rewards and accuracies per optimizer step
    metrics.jsonl                                  stage "timing" (seconds per pipeline stage), stage "sft" (loss)
    config.yaml                                    the trained-on tasks (which split in-domain from out-of-domain),
                                                   dpo.beta and dpo.reference

A missing source leaves its section with one line saying so. Plots are drawn on bare matplotlib
``Figure`` objects (Agg canvas), so making a report touches no global pyplot state.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from selfrefine_dist.eval.compare import (MDE_NOTE, POOLED, differences_by_scope, headline, mde_points, points,
                                         train_tasks_in)

ROUND_STAGES = ("sample", "pair", "reference_logps", "dpo", "export", "sync", "eval", "validate", "probe")


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
    config = _read_config(run_dir)
    sections = [(_accuracy_section, evals, plots), (_change_section, evals, run_dir, config),
                (_rounds_section, summaries, plots), (_dpo_section, histories, plots),
                (_why_section, summaries, histories, config, _pooled_accuracy(run_dir / "validation" / "sft"), plots),
                (_timing_section, metrics, summaries, plots), (_memory_section, metrics, summaries),
                (_sft_section, metrics, plots)]
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


def _pooled_accuracy(stem: Path) -> Optional[float]:
    """Accuracy over every question of ``<stem>_samples.jsonl`` (e.g. validation/sft); None without the file."""
    rows = _read_jsonl(stem.with_name(f"{stem.name}_samples.jsonl"))
    return sum(bool(r.get("correct")) for r in rows) / len(rows) if rows else None


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


def _read_config(run_dir: Path) -> Optional[dict]:
    """The run's resolved ``config.yaml``; None when it cannot be read."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


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


def _final_model(evals: Dict[str, dict], run_dir: Path) -> Tuple[Optional[str], str]:
    """(label to compare sft with, a sentence saying why that one): final.json's choice when it was evaluated,
    else the last round."""
    rounds = [s for s in evals if _stage_order(s)[0] == 2]
    last = rounds[-1] if rounds else None
    final = _read_json(run_dir / "final.json")
    chosen = final.get("label") if final else None
    if chosen is None:
        return last, f"{last} is the last round." if last else ""
    picked = f"final.json: {chosen} (round {final.get('round', '-')}), reason: {final.get('reason', '-')}"
    if chosen == "sft":
        return last, f"The final model is sft itself ({picked}); the last round, {last}, is shown for reference."
    if chosen not in evals:
        return last, f"final.json names {chosen}, but eval/{chosen}.json is not there; the last round, {last}, instead."
    return chosen, f"{chosen} is the final model ({picked})."


def _change_section(evals: Dict[str, dict], run_dir: Path, config: Optional[dict]) -> str:
    target, why = _final_model(evals, run_dir)
    if "sft" not in evals or target is None:
        return "## Change from sft to the last round\n\nNeeds the sft evaluation and at least one round's; not found."
    before, after = (_read_jsonl(run_dir / "eval" / f"{s}_samples.jsonl") for s in ("sft", target))
    if not before or not after:
        return f"## Change from sft to {target}\n\nPer-question outcomes (eval/<label>_samples.jsonl) not found."
    stored = evals[target].get("train_tasks", evals["sft"].get("train_tasks"))
    train = stored if stored is not None else train_tasks_in(config)
    diffs = differences_by_scope(before, after, train)
    lines = [headline(name, d) for name, d in diffs.items() if name in POOLED]
    rows = [[name, d.n, points(d), "yes" if d.excludes_zero else "no", mde_points(d)] for name, d in diffs.items()]
    table = _table(["scope", "questions", "change (points) [95% CI]", "interval excludes 0", "MDE (points)"], rows)
    note = f"Paired bootstrap over the questions both evaluations answered (matched by uid and task). {MDE_NOTE}"
    return f"## Change from sft to {target}\n\n{why}\n\n{note}\n\n" + "\n".join(lines) + f"\n\n{table}"


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


def _displacement(history: List[dict], beta: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Per step, the policy's chosen and rejected log-probs minus the reference's (summed over the response, nats):
    TRL's rewards/chosen and rewards/rejected are beta * (policy logp - reference logp). Without beta: the rewards."""
    scale = beta if beta else 1.0
    return tuple(np.array([h.get(k, np.nan) for h in history], dtype=float) / scale
                 for k in ("rewards/chosen", "rewards/rejected"))


def _falling(values: np.ndarray) -> bool:
    """Below zero at the last step and decreasing over the round (least-squares slope < 0; each step's values come
    from a different batch, so a fit is steadier than last minus first)."""
    x = np.flatnonzero(np.isfinite(values))
    return len(x) >= 2 and values[x[-1]] < 0 and np.polyfit(x, values[x], 1)[0] < 0


def _percent(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


SHARE_KEYS = ("sample_accuracy", "no_answer_rate", "lucky_share", "probe_accuracy_before", "probe_accuracy_after",
              "validation_accuracy")  # round summary keys holding fractions, shown as percentages


def _summary_cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key.startswith("pass_at_") or key in SHARE_KEYS:
        return _percent(value)
    return f"{value:.0f}" if key == "mean_path_tokens" else str(value)


def _verdict(s: dict, prev: Optional[dict], prev_name: str, shift: Optional[Tuple[np.ndarray, np.ndarray]]) -> str:
    """What the numbers say about a round (summary ``s``) next to the stage before it (``prev``, named
    ``prev_name``): gains first, then losses, then the rest; facts, not causes."""
    good, bad, other = [], [], []
    prev = prev or {}
    before, after, n = s.get("probe_accuracy_before"), s.get("probe_accuracy_after"), s.get("probe_questions")
    if before is not None and after is not None:
        change, on = 100 * (after - before), "" if n is None else f" on {n}"
        if change > 0:
            good.append(f"learned its own questions ({change:+.1f} points{on})")
        elif change < 0:
            bad.append(f"lost ground on its own questions ({change:+.1f} points{on})")
        else:
            other.append(f"no change on its own questions ({100 * after:.1f}%{on})")
    if s.get("validation_accuracy") is not None and prev.get("validation_accuracy") is not None:
        change = 100 * (s["validation_accuracy"] - prev["validation_accuracy"])
        if change:
            (good if change > 0 else bad).append(f"validation {change:+.1f} points vs {prev_name}")
        else:
            other.append(f"validation unchanged vs {prev_name}")
    if shift is not None and len(shift[0]) and np.isfinite(shift[0][-1]) and np.isfinite(shift[1][-1]):
        chosen, rejected = shift[0][-1], shift[1][-1]
        values = f"chosen {chosen:+.2f}, rejected {rejected:+.2f} vs the reference"
        if _falling(shift[0]) and _falling(shift[1]):
            bad.append(f"likelihood displacement: chosen and rejected both fell ({values})")
        elif chosen < 0:
            bad.append(f"chosen paths less likely than under the reference ({values})")
        elif rejected < 0:
            good.append(f"chosen up, rejected down ({values})")
    for key, what in [("no_answer_rate", "no-answers"), ("lucky_share", "lucky answers")]:  # more of either: worse
        if s.get(key) is not None and prev.get(key) is not None and s[key] != prev[key]:
            more = s[key] > prev[key]
            (bad if more else good).append(f"{'more' if more else 'fewer'} {what} "
                                           f"({_percent(prev[key])} -> {_percent(s[key])})")
    a, b = prev.get("mean_path_tokens"), s.get("mean_path_tokens")
    if a and b is not None and abs(b - a) >= 0.1 * a:  # a tenth or more: worth a mention, not a judgement
        other.append(f"{'longer' if b > a else 'shorter'} paths ({a:.0f} -> {b:.0f} tokens)")
    if not good + bad + other:
        return "no before/after numbers recorded"
    text = "; ".join(good) + (" but " if good and bad else "") + "; ".join(bad)
    return "; ".join(t for t in [text, "; ".join(other)] if t)


def _why_section(summaries: Dict[int, dict], histories: Dict[int, List[dict]], config: Optional[dict],
                 sft_validation: Optional[float], plots: Path) -> str:
    title = "## Why each round helped or hurt"
    if not summaries and not histories:
        return f"{title}\n\nNo finished rounds (rounds/round_NN/summary.json, dpo_metrics.jsonl) found."
    dpo = (config or {}).get("dpo") or {}
    beta, reference = dpo.get("beta"), dpo.get("reference", "sft")
    shifts = {r: _displacement(h, beta) for r, h in histories.items()}
    parts = [title]
    if shifts:
        unit = "log-prob change vs reference (nats)" if beta else "TRL reward (beta x log-prob change)"
        fig, (ax,) = _figure(1, width=8)
        start = 1
        for r, (chosen, rejected) in shifts.items():
            x = np.arange(start, start + len(chosen))
            ax.plot(x, chosen, color="C0", label="chosen" if start == 1 else None)
            ax.plot(x, rejected, color="C1", label="rejected" if start == 1 else None)
            ax.axvline(start - 0.5, color="grey", ls=":", lw=1)
            ax.text(start - 0.5, 1, f" round {r}", transform=ax.get_xaxis_transform(), va="top", fontsize="small")
            start += len(chosen)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xlabel="optimizer step", ylabel=unit, title="likelihood of chosen and rejected paths")
        ax.legend(fontsize="small")
        how = (f"rewards / beta, beta = {beta}" if beta else
               "beta unknown (config.yaml dpo.beta not readable): TRL's rewards, beta times the change")
        parts.append(f"Likelihood displacement: per DPO step, the policy's log-probability of the chosen and the "
                     f"rejected path minus the reference's ({reference}), summed over the response ({how}). "
                     "DPO widens the gap; when both fall, probability moves to paths that are neither.\n\n"
                     + _save(fig, plots, "displacement"))
        signed = lambda v: f"{v:+.2f}" if np.isfinite(v) else "-"  # noqa: E731 -- a step without the reward key
        rows = [[r, len(c), signed(c[-1]), signed(j[-1]), "yes" if _falling(c) and _falling(j) else "no"]
                for r, (c, j) in shifts.items()]
        parts.append(_table(["round", "steps", "chosen (last step)", "rejected (last step)", "both falling"], rows))
    if summaries:
        pass_keys = sorted({k for s in summaries.values() for k in s if k.startswith("pass_at_")})
        cols = ["sample_accuracy", *pass_keys, "no_answer_rate", "mean_path_tokens", "lucky_share",
                "probe_accuracy_before", "probe_accuracy_after", "probe_questions", "validation_accuracy", "pairs_kept"]
        parts.append(_table(["round", *cols], [[r, *(_summary_cell(c, s.get(c)) for c in cols)]
                                               for r, s in summaries.items()]))
        parts.append("probe_accuracy_*: greedy accuracy on the round's own questions before and after its DPO; "
                     "sample_accuracy, pass_at_K: the round's sampled paths.")
    before = {0: {"validation_accuracy": sft_validation}, **summaries}  # round 1 follows sft
    verdicts = [f"- **round {r}**: "
                + _verdict(summaries.get(r, {}), before.get(r - 1), f"round {r - 1}" if r > 1 else "sft", shifts.get(r))
                + "." for r in sorted(set(summaries) | set(shifts))]
    parts.append("\n".join(verdicts))
    return "\n\n".join(parts)


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


def _memory_section(metrics: List[dict], summaries: Dict[int, dict]) -> str:
    """Peak resident memory per stage (GiB): the largest learner rank's, the largest sampler actor's."""
    sft = [m["peak_rss_gib"] for m in metrics if m.get("stage") == "sft" and isinstance(m.get("peak_rss_gib"), (int, float))]
    rows = [["SFT (learner)", _num(max(sft))]] if sft else []
    for r, s in summaries.items():
        for key, what in (("sampler_peak_rss_gib", "sampling (sampler)"),
                          ("dpo_reference_peak_rss_gib", "reference pass (learner)"),
                          ("dpo_peak_rss_gib", "DPO steps (learner)")):
            if isinstance(s.get(key), (int, float)):
                rows.append([f"round {r}: {what}", _num(s[key])])
    if not rows:
        return "## Memory\n\nNo peak memory figures in metrics.jsonl or the round summaries."
    return ("## Memory\n\nPeak resident memory (GiB, Linux VmHWM) of the largest process of each kind during "
            "each stage: a learner rank, or a sampler actor with the engine processes it started.\n\n"
            + _table(["stage", "peak RSS GiB"], rows))


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
