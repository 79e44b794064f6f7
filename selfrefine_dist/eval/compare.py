"""``selfrefine compare``: the paired change between evaluations, with the smallest change each can resolve.

    selfrefine compare runs/demo/eval/sft.json runs/demo                # sft -> the run's final evaluation
    selfrefine compare runs/a:sft runs/a runs/b --train-tasks gsm8k     # two runs against one baseline

The first source is the baseline; every later one is compared with it on the questions both answered
(matched by uid and task): per task, and pooled in-domain (the tasks trained on) and out-of-domain.
A source is

    .../eval/<label>.json            an evaluation (its samples file lies beside it)
    .../eval/<label>_samples.jsonl   the per-question outcomes of an evaluation
    RUN_DIR                          the run's final evaluation: final.json's "label", else the last
                                     eval/round_N.json by N, else eval/sft.json
    RUN_DIR:LABEL                    eval/LABEL of that run (runs/x:sft, runs/x:round_2)

The in-domain tasks come from the evaluation's own ``train_tasks``, else the run's config.yaml
(``data.train[*].task``), else ``--train-tasks``; with none known only per-task changes are given.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from selfrefine_dist.eval.stats import Difference, paired_difference


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's per-question outcomes (rows with uid, task, correct) and where its split came from."""

    label: str
    samples_file: Path
    rows: List[dict]
    train_tasks: Optional[List[str]]  # None: unknown
    train_tasks_from: str  # where train_tasks was read, for the report
    source: str  # as given on the command line
    chosen_by: str  # for a run directory: why this evaluation is its final one; else ""


# ---- reading the sources ------------------------------------------------------------------

def train_tasks_in(config: Optional[dict]) -> Optional[List[str]]:
    """The tasks trained on, ``data.train[*].task`` of a resolved config; None when it does not say."""
    try:
        return sorted({d["task"] for d in config["data"]["train"]})
    except (KeyError, TypeError):
        return None


def config_train_tasks(run_dir: Path) -> Optional[List[str]]:
    """The tasks trained on, from the run's resolved ``config.yaml``; None when it cannot be read."""
    import yaml

    try:
        return train_tasks_in(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError):
        return None


def final_label(run_dir: Path) -> str:
    """The label of a run's final evaluation: ``final.json``'s "label" (the round chosen on validation),
    else the last ``eval/round_N.json`` by N, else "sft"."""
    run_dir = Path(run_dir)
    final = run_dir / "final.json"
    if final.is_file():
        try:
            return str(json.loads(final.read_text())["label"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{final}: no \"label\" in it ({e!r})") from e
    rounds = [(int(m[1]), p.stem) for p in (run_dir / "eval").glob("round_*.json")
              if (m := re.fullmatch(r"round_(\d+)", p.stem))]
    return max(rounds)[1] if rounds else "sft"


def _split_source(source: str) -> Tuple[Path, Optional[str]]:
    """(path, label): ``RUN_DIR:LABEL`` split at its last colon when the whole string names no path."""
    path = Path(source)
    if not path.exists() and ":" in source:
        run_dir, label = source.rsplit(":", 1)
        if label and Path(run_dir).is_dir():
            return Path(run_dir), label
    return path, None


def _files(source: str) -> Tuple[Path, Path, Optional[Path], str]:
    """(summary json, samples jsonl, run dir or None, why this evaluation when the source is a run directory)
    of a source; raises FileNotFoundError naming the path."""
    path, label = _split_source(source)
    chosen_by = ""
    if label is None:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory"
                                    + (" (nor RUN_DIR:LABEL with an existing RUN_DIR)" if ":" in source else ""))
        if path.is_dir():
            if not (path / "eval").is_dir():
                raise FileNotFoundError(f"{path / 'eval'}: not found; {path} is not a run directory")
            label = final_label(path)
            chosen_by = ("final.json" if (path / "final.json").is_file() else
                         "the last round" if label.startswith("round_") else "no round evaluated")
    if label is not None:  # a run directory
        summary, samples, run_dir = path / "eval" / f"{label}.json", path / "eval" / f"{label}_samples.jsonl", path
    elif path.name.endswith("_samples.jsonl"):
        samples, summary = path, path.with_name(path.name[: -len("_samples.jsonl")] + ".json")
        run_dir = None
    elif path.suffix == ".json":
        summary, samples, run_dir = path, path.with_name(f"{path.stem}_samples.jsonl"), None
    else:
        raise ValueError(f"{path}: not an evaluation (<label>.json, <label>_samples.jsonl), a run directory "
                         "or RUN_DIR:LABEL")
    if not samples.is_file():
        raise FileNotFoundError(f"{samples}: per-question outcomes not found (source {source!r})")
    if run_dir is None and samples.parent.name == "eval":  # <run>/eval/<label>...: the run's config splits the tasks
        run_dir = samples.parent.parent
    return summary, samples, run_dir, chosen_by


def _read_rows(path: Path) -> List[dict]:
    rows, seen = [], set()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e})") from e
        if not isinstance(row, dict) or not {"uid", "task", "correct"} <= set(row):
            raise ValueError(f"{path}:{i}: a row needs uid, task and correct")
        if (row["uid"], row["task"]) in seen:
            raise ValueError(f"{path}:{i}: question {row['uid']!r} of task {row['task']!r} appears twice")
        seen.add((row["uid"], row["task"]))
        rows.append(row)
    return rows


def load_evaluation(source: str, train_tasks: Optional[Sequence[str]] = None) -> Evaluation:
    """Read one source (see the module docstring); ``train_tasks`` is the last resort for the split."""
    summary_file, samples_file, run_dir, chosen_by = _files(source)
    summary = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{summary_file}: not JSON ({e})") from e
    label = summary.get("label") or samples_file.name[: -len("_samples.jsonl")]
    tasks, origin = summary.get("train_tasks"), str(summary_file)
    if tasks is None and run_dir is not None:
        tasks, origin = config_train_tasks(run_dir), str(run_dir / "config.yaml")
    if tasks is None and train_tasks:
        tasks, origin = list(train_tasks), "--train-tasks"
    return Evaluation(label, samples_file, _read_rows(samples_file), sorted(tasks) if tasks is not None else None,
                      origin if tasks is not None else "unknown", source, chosen_by)


# ---- the comparison -----------------------------------------------------------------------

def scopes(tasks: Sequence[str], train_tasks: Optional[Sequence[str]]) -> List[Tuple[str, set]]:
    """(name, tasks in it): "in-domain" and "out-of-domain" (or "all tasks" when the trained-on tasks are
    unknown), then each task."""
    if train_tasks is None:
        pooled = [("all tasks", set(tasks))]
    else:
        pooled = [("in-domain", set(tasks) & set(train_tasks)), ("out-of-domain", set(tasks) - set(train_tasks))]
    return pooled + [(t, {t}) for t in sorted(tasks)]


POOLED = ("in-domain", "out-of-domain", "all tasks")


def differences_by_scope(before: Sequence[dict], after: Sequence[dict], train_tasks: Optional[Sequence[str]],
                         resamples: int = 2000, seed: int = 0) -> Dict[str, Difference]:
    """The paired change per scope (see ``scopes``), in that order; scopes without a shared question are left out."""
    tasks = sorted({r["task"] for r in before} | {r["task"] for r in after})
    out = {}
    for name, keep in scopes(tasks, train_tasks):
        diff = paired_difference([r for r in before if r["task"] in keep], [r for r in after if r["task"] in keep],
                                 resamples, seed)
        if diff.n:
            out[name] = diff
    return out


def points(diff: Difference) -> str:
    """'+4.2 [+1.0, +7.5]': the change and its 95% interval in accuracy points."""
    return f"{100 * diff.mean:+.1f} [{100 * diff.ci_low:+.1f}, {100 * diff.ci_high:+.1f}]"


def mde_points(diff: Difference) -> str:
    """The MDE in points; '-' with fewer than 2 questions; 0 when no question changed outcome (sd(d) = 0)."""
    if diff.mde != diff.mde:  # NaN
        return "-"
    return f"{100 * diff.mde:.1f}" + (" (no question changed)" if diff.mde == 0 else "")


def headline(name: str, diff: Difference) -> str:
    """One scope in words: the change, whether its interval excludes 0, and the smallest resolvable change."""
    verdict = "excludes 0." if diff.excludes_zero else "includes 0: no clear change."
    if diff.mde != diff.mde:
        mde = "cannot be estimated from fewer than 2 questions."
    elif diff.mde == 0:
        mde = "not estimable, no question changed outcome."
    else:
        mde = f"{100 * diff.mde:.1f} points."
    return (f"- **{name}**: {points(diff)} points (n={diff.n}); the interval {verdict} "
            f"Smallest resolvable change (MDE): {mde}")


MDE_NOTE = ("MDE: the smallest change these questions resolve at 95% confidence with 80% power, "
            "(1.96 + 0.84) * sd(d) / sqrt(n), d the per-question change.")


def _accuracy_on(rows: Sequence[dict], keys: set) -> float:
    hits = [float(bool(r["correct"])) for r in rows if (r["uid"], r["task"]) in keys]
    return sum(hits) / len(hits)


def _comparison(base: Evaluation, other: Evaluation, name: str, base_name: str, resamples: int, seed: int) -> str:
    keys = lambda e: {(r["uid"], r["task"]) for r in e.rows}  # noqa: E731
    shared = keys(base) & keys(other)
    lines = [f"## {name} vs {base_name}", ""]
    lines.append(f"{len(shared)} shared questions; {len(keys(base) - shared)} only in {base_name}, "
                 f"{len(keys(other) - shared)} only in {name}.")
    train = other.train_tasks if other.train_tasks is not None else base.train_tasks
    origin = other.train_tasks_from if other.train_tasks is not None else base.train_tasks_from
    if train is None:
        lines.append("Trained-on tasks unknown (no train_tasks in the evaluations, no config.yaml, no --train-tasks): "
                     "per task only.")
    else:
        lines.append(f"In-domain tasks: {', '.join(train) or 'none'} (from {origin}).")
        if base.train_tasks is not None and other.train_tasks is not None and base.train_tasks != other.train_tasks:
            lines.append(f"Note: {base_name} was trained on {', '.join(base.train_tasks)}; the split follows {name}.")
    if not shared:
        return "\n".join(lines + ["", "No shared questions: nothing to compare."])
    diffs = differences_by_scope(base.rows, other.rows, train, resamples, seed)
    lines += [""] + [headline(s, d) for s, d in diffs.items() if s in POOLED]
    keep_of, rows = dict(scopes(sorted({k[1] for k in shared}), train)), []
    for scope, d in diffs.items():
        in_scope = {k for k in shared if k[1] in keep_of[scope]}
        rows.append([scope, d.n, f"{100 * _accuracy_on(base.rows, in_scope):.1f}",
                     f"{100 * _accuracy_on(other.rows, in_scope):.1f}", points(d),
                     "yes" if d.excludes_zero else "no", mde_points(d)])
    header = ["scope", "shared questions", f"{base_name} (%)", f"{name} (%)", "change (points) [95% CI]",
              "interval excludes 0", "MDE (points)"]
    return "\n".join(lines + ["", _table(header, rows)])


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def compare_evaluations(sources: Sequence[str], train_tasks: Optional[Sequence[str]] = None, resamples: int = 2000,
                        seed: int = 0) -> str:
    """A markdown report: each of ``sources[1:]`` against ``sources[0]`` on the questions both answered."""
    if len(sources) < 2:
        raise ValueError(f"compare needs a baseline and at least one more evaluation; got {len(sources)} source(s)")
    evals = [load_evaluation(s, train_tasks) for s in sources]
    labels = [e.label for e in evals]
    names = labels if len(set(labels)) == len(labels) else [e.source for e in evals]  # same label in two runs
    intro = (f"# Comparison against {names[0]}\n\nPaired bootstrap ({resamples} resamples, seed {seed}) over the "
             "questions both evaluations answered, matched by uid and task; change = accuracy after minus before, "
             f"in points, with its 95% interval. {MDE_NOTE}")
    listing = _table(["", "evaluation", "source", "samples file", "questions"],
                     [["baseline" if i == 0 else i, names[i],
                       f"`{e.source}`" + (f" (final evaluation: {e.chosen_by})" if e.chosen_by else ""),
                       f"`{e.samples_file}`", len(e.rows)]
                      for i, e in enumerate(evals)])
    parts = [intro, listing] + [_comparison(evals[0], e, name, names[0], resamples, seed)
                                for e, name in zip(evals[1:], names[1:])]
    return "\n\n".join(parts) + "\n"


def compare_main(argv: List[str]) -> int:
    """``selfrefine compare SOURCE SOURCE... [--train-tasks a,b] [--resamples N] [--seed S] [--out FILE]``."""
    p = argparse.ArgumentParser(prog="selfrefine compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="the baseline first, then the evaluations to compare with it")
    p.add_argument("--train-tasks", action="append", default=[],
                   help="tasks trained on, comma-separated (used when neither the evaluation nor its run says)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    args = p.parse_args(argv)
    tasks = [t.strip() for arg in args.train_tasks for t in arg.split(",") if t.strip()] or None
    try:
        report = compare_evaluations(args.sources, tasks, args.resamples, args.seed)
    except (OSError, ValueError) as e:
        print(f"selfrefine compare: error: {e}", file=sys.stderr)
        return 2
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0
