"""``selfrefine sweep``: run the variants of a grid one after another, sharing the stages they share.

    selfrefine sweep --config configs/sweep_cpu.yaml --grid "dpo.lr=[1.0e-6,5.0e-6]" "dpo.beta=[0.1,0.3]" \
        --seeds 0 1 2
    selfrefine sweep --config configs/sweep_cpu.yaml --one-at-a-time \
        --grid "refine.pair_strategy=[cot_vs_direct]" "dpo.rpo_alpha=[null,1.0]"     # base + 3 variants

Each variant (one point of the grid, one seed) is a run directory ``<sweep>/<variant>/`` with
``run.reuse_from=<sweep>``: a stage whose fingerprint matches a finished stage of an earlier variant
is linked, not recomputed, so a grid over DPO keys trains one SFT per seed and samples round 1 once
per seed. ``<sweep>/sweep.md`` holds one table (every variant's final model against its SFT model:
the paired change with its 95% interval, in-domain and out-of-domain, and the minutes it took) and
one plot (``sweep.png``). Tune on a validation split (``data.eval``) and report on a test split.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from selfrefine_dist.config import ConfigError, load_config


@dataclass(frozen=True)
class Variant:
    """One run of the sweep: the grid values it takes and its seed."""

    name: str
    settings: Tuple[Tuple[str, str], ...]  # (key, value as an override string)
    seed: Optional[int]

    @property
    def overrides(self) -> List[str]:
        seed = [f"run.seed={self.seed}", f"sampler.seed={self.seed}"] if self.seed is not None else []
        return [f"{k}={v}" for k, v in self.settings] + seed


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["dpo.lr=[1.0e-6,5.0e-6]"]`` -> ``[("dpo.lr", ["1.0e-6", "5.0e-6"])]`` (values kept as override text)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grid '{item}': expected key.sub=[value, value, ...]")
        try:
            parsed = yaml.safe_load(values)
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid '{item}': not a YAML list ({e})") from None
        if not isinstance(parsed, list) or not parsed:
            raise ConfigError(f"--grid '{item}': expected a non-empty list of values in [...]")
        grid.append((key.strip(), [v if isinstance(v, str) else json.dumps(v) for v in parsed]))
    return grid


def variants(grid: Sequence[Tuple[str, List[str]]], seeds: Sequence[int] = (),
             one_at_a_time: bool = False) -> List[Variant]:
    """The grid's cartesian product, times the seeds; names are readable and safe as folder names.

    ``one_at_a_time``: an ablation instead of a product: the config as it is ("base"), then each value of
    each key alone, every other key left at the config's value."""
    out = []
    if one_at_a_time:
        points = [()] + [((key, v),) for key, vals in grid for v in vals]
    else:
        points = [tuple((key, v) for (key, _), v in zip(grid, values))
                  for values in itertools.product(*[vals for _, vals in grid])]
    for settings in points:
        for seed in (list(seeds) or [None]):
            parts = [f"{key.split('.')[-1]}={re.sub(r'[][ ]', '', v).replace(',', '-')}" for key, v in settings] + ([f"seed={seed}"] if seed is not None else [])
            name = re.sub(r"[^A-Za-z0-9_.=+-]", "", "_".join(parts)) or ("base" if one_at_a_time else "default")
            out.append(Variant(name, settings, seed))
    return out


def run_sweep(config: str, grid_items: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
              sweep_dir: Optional[str] = None, one_at_a_time: bool = False) -> Path:
    """Run every variant (skipping finished ones), then write ``sweep.md``; returns its path."""
    from selfrefine_dist.pipeline import run_pipeline
    from selfrefine_dist.run_dir import write_resolved_config
    from selfrefine_dist.tracking import MetricsLogger, config_dict

    runs = variants(parse_grid(grid_items), seeds, one_at_a_time)
    root = Path(sweep_dir or Path("runs") / f"sweep_{Path(config).stem}")
    cfgs = {}
    for v in runs:  # every variant's config is checked before the first one runs
        cfgs[v.name] = load_config(config, [*overrides, *v.overrides, f"run.dir={root / v.name}",
                                            f"run.reuse_from={root}"])
    root.mkdir(parents=True, exist_ok=True)
    plan = {"config": str(config), "grid": list(grid_items), "one_at_a_time": one_at_a_time, "seeds": list(seeds),
            "overrides": list(overrides),
            "variants": [{"name": v.name, "overrides": v.overrides} for v in runs]}
    (root / "sweep.json").write_text(json.dumps(plan, indent=2))
    timings = _read_timings(root)
    for i, v in enumerate(runs, 1):
        cfg, run_dir = cfgs[v.name], root / v.name
        print(f"\n=== sweep {root.name}: variant {i}/{len(runs)} {v.name} ({' '.join(v.overrides) or 'defaults'})",
              flush=True)
        t0 = time.perf_counter()
        config_file = write_resolved_config(cfg, run_dir)
        logger = MetricsLogger(run_dir, wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                               wandb_run_name=f"{root.name}/{v.name}", config=config_dict(cfg), group=root.name)
        try:
            run_pipeline(cfg, run_dir, config_file, logger=logger)
        finally:
            logger.finish()
        timings[v.name] = timings.get(v.name, 0.0) + time.perf_counter() - t0
        (root / "timings.json").write_text(json.dumps(timings, indent=2))
        write_sweep_report(root, runs, timings)
    path = write_sweep_report(root, runs, timings)
    print(f"\nsweep: {path}", flush=True)
    return path


def _read_timings(root: Path) -> Dict[str, float]:
    path = root / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _samples(run_dir: Path, label: str) -> Optional[List[dict]]:
    path = run_dir / "eval" / f"{label}_samples.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def variant_changes(run_dir: Path, train_tasks: Sequence[str]) -> Optional[dict]:
    """The final model against SFT on the evaluation both answered: paired changes, in- and out-of-domain."""
    from selfrefine_dist.eval.stats import paired_difference

    final_file = run_dir / "final.json"
    if not final_file.is_file():
        return None
    final = json.loads(final_file.read_text())
    before, after = _samples(run_dir, "sft"), _samples(run_dir, final["label"])
    if before is None or after is None:
        return None
    out = {"final": final["label"]}
    for split, keep in (("in_domain", lambda t: t in train_tasks), ("out_of_domain", lambda t: t not in train_tasks)):
        b, a = [r for r in before if keep(r["task"])], [r for r in after if keep(r["task"])]
        out[split] = paired_difference(b, a)
        out[f"{split}_sft"] = sum(r["correct"] for r in b) / len(b) if b else float("nan")
        out[f"{split}_final"] = sum(r["correct"] for r in a) / len(a) if a else float("nan")
    return out


def _pct(d) -> str:
    if d.n == 0:
        return "-"
    mark = " *" if d.excludes_zero else ""
    return f"{100 * d.mean:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]{mark}"


def write_sweep_report(root: Path, runs: Sequence[Variant], timings: Dict[str, float]) -> Path:
    """``sweep.md`` and ``sweep.png`` from the variants' run directories."""
    rows, plotted = [], []
    for v in runs:
        run_dir = root / v.name
        cfg_file = run_dir / "config.yaml"
        tasks = sorted({d["task"] for d in yaml.safe_load(cfg_file.read_text())["data"]["train"]}) if cfg_file.is_file() else []
        ch = variant_changes(run_dir, tasks)
        settings = ", ".join(f"{k}={val}" for k, val in v.settings) or "defaults"
        minutes = f"{timings[v.name] / 60:.1f}" if v.name in timings else "-"
        if ch is None:
            rows.append([v.name, settings, "-" if v.seed is None else v.seed, "not finished", "-", "-", "-", "-", minutes])
            continue
        plotted.append((v.name, ch))
        rows.append([v.name, settings, "-" if v.seed is None else v.seed, ch["final"],
                     f"{100 * ch['in_domain_sft']:.1f} -> {100 * ch['in_domain_final']:.1f}", _pct(ch["in_domain"]),
                     f"{100 * ch['out_of_domain_sft']:.1f} -> {100 * ch['out_of_domain_final']:.1f}",
                     _pct(ch["out_of_domain"]), minutes])
    header = ["variant", "settings", "seed", "final", "in-domain % (sft -> final)", "in-domain change [95% CI]",
              "out-of-domain % (sft -> final)", "out-of-domain change [95% CI]", "minutes"]
    lines = [f"# Sweep {root.name}", "",
             "Every variant's final model (`final.json`: the last round, or the best on validation) against its own "
             "SFT model, paired on the questions both answered: mean change in accuracy (points) with its 95% "
             "bootstrap interval; * marks an interval that excludes zero. Minutes: wall time of the variant in this "
             "sweep (stages linked from earlier variants cost nothing).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += _seed_summary(runs, dict(plotted))
    if plotted:
        _plot(root / "sweep.png", plotted)
        lines += ["", "![changes against SFT](sweep.png)"]
    path = root / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _seed_summary(runs: Sequence[Variant], changes: Dict[str, dict]) -> List[str]:
    """Mean and spread over seeds of each grid point's change (only when there are several seeds)."""
    groups: Dict[Tuple, List[dict]] = {}
    for v in runs:
        if v.seed is not None and v.name in changes:
            groups.setdefault(v.settings, []).append(changes[v.name])
    if not any(len(g) > 1 for g in groups.values()):
        return []
    out = ["", "Over seeds (mean ± standard deviation of the per-seed changes, points):", "",
           "| settings | seeds | in-domain change | out-of-domain change |", "|---|---|---|---|"]
    for settings, chs in groups.items():
        cells = []
        for split in ("in_domain", "out_of_domain"):
            x = np.array([100 * c[split].mean for c in chs if c[split].n])
            cells.append(f"{x.mean():+.1f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.1f}" if len(x) else "-")
        out.append(f"| {', '.join(f'{k}={v}' for k, v in settings) or 'defaults'} | {len(chs)} | {cells[0]} | {cells[1]} |")
    return out


def _plot(path: Path, plotted: Sequence[Tuple[str, dict]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.5 * len(plotted) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(plotted))
    for offset, split, color in ((-0.15, "in_domain", "tab:blue"), (0.15, "out_of_domain", "tab:orange")):
        d = [c[split] for _, c in plotted]
        mean = np.array([100 * x.mean for x in d])
        err = np.array([[100 * (x.mean - x.ci_low), 100 * (x.ci_high - x.mean)] for x in d]).T
        ax.errorbar(mean, y + offset, xerr=err, fmt="o", color=color, capsize=3, label=split.replace("_", "-"))
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(y, [name for name, _ in plotted], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("change against SFT (points, 95% CI)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
