"""The whole method, stage by stage: SFT on teacher demonstrations, then evaluation.

Each stage writes into the run directory and is skipped when its output is
already there, so running the same command again continues where it stopped.
(The self-refine rounds join this sequence in the loop's own module.)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List

from selfrefine_dist.config import Config
from selfrefine_dist.data.sources import load_slices
from selfrefine_dist.eval.evaluate import EvalResult, comparison_table, evaluate_hf_model, write_result
from selfrefine_dist.launch import run_learners
from selfrefine_dist.models.loading import resolve_model_path
from selfrefine_dist.tracking import MetricsLogger


def train_tasks(cfg: Config) -> List[str]:
    return sorted({ds.task for ds in cfg.data.train})


def run_eval_stage(cfg: Config, run_dir: Path, label: str, model_path: str, logger: MetricsLogger) -> EvalResult:
    t0 = time.perf_counter()
    result = evaluate_hf_model(
        label, model_path, load_slices(cfg.data.eval), train_tasks(cfg), cfg.eval.max_new_tokens, cfg.eval.batch_size,
        cfg.eval.bootstrap_samples, cfg.model.trust_remote_code, cfg.logging.progress_bars,
    )
    write_result(result, run_dir / "eval")
    metrics = {f"{t}_accuracy": a.accuracy for t, a in result.per_task.items()}
    metrics.update(in_domain_accuracy=result.in_domain.accuracy, out_of_domain_accuracy=result.out_of_domain.accuracy,
                   seconds=time.perf_counter() - t0)
    logger.log(metrics, stage=f"eval/{label}")
    print(f"eval {label}: in-domain {result.in_domain} | out-of-domain {result.out_of_domain}", flush=True)
    return result


def run_pipeline(cfg: Config, run_dir: Path, config_file: Path) -> List[EvalResult]:
    logger = MetricsLogger(run_dir, wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                           wandb_run_name=cfg.logging.wandb_run_name)
    stage_seconds = {}

    t0 = time.perf_counter()
    sft_model = run_dir / "sft" / "model"
    if not (sft_model / "config.json").is_file():
        # Resolve packaged models once here, not in every learner at the same time.
        resolve_model_path(cfg.model.name_or_path)
        run_learners(cfg.distributed.launcher, cfg.distributed.nproc_per_node, cfg.distributed.master_port,
                     ["sft", "--config", str(config_file)])
    stage_seconds["sft"] = time.perf_counter() - t0

    results = []
    models = ([("base", resolve_model_path(cfg.model.name_or_path))] if cfg.eval.include_base else [])
    models.append(("sft", str(sft_model)))
    for label, path in models:
        t0 = time.perf_counter()
        results.append(run_eval_stage(cfg, run_dir, label, path, logger))
        stage_seconds[f"eval_{label}"] = time.perf_counter() - t0
    logger.log({f"{k}_s": v for k, v in stage_seconds.items()}, stage="timing")
    table = comparison_table(results)
    (run_dir / "eval" / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {run_dir / 'eval'}", flush=True)
    logger.finish()
    return results
