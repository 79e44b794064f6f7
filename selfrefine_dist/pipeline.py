"""The whole method, stage by stage:

    teach (optional) -> SFT -> evaluate base and SFT -> self-refine rounds (evaluated) -> table, report

Each stage writes into the run directory and is skipped when its output is already there, so
running the same command again continues where it stopped. SFT runs on learner processes
started by torchrun or the deepspeed launcher; sampling, evaluation and the DPO rounds run on
Ray actors (a local Ray, or the cluster named by ``ray.address``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List

from selfrefine_dist.config import Config
from selfrefine_dist.data.sources import load_slices
from selfrefine_dist.eval.evaluate import EvalResult, comparison_table, evaluate_with_pool, read_result, write_result
from selfrefine_dist.launch import run_learners
from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype, resolve_model_path
from selfrefine_dist.tracking import MetricsLogger


def train_tasks(cfg: Config) -> List[str]:
    return sorted({ds.task for ds in cfg.data.train})


def start_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True)


def make_pool(cfg: Config, model_path: str):
    from selfrefine_dist.sampling.pool import SamplerPool

    return SamplerPool(cfg.sampler, model_path, resolve_dtype(cfg.model.dtype), cfg.model.trust_remote_code)


def without_training_questions(eval_examples, train_examples):
    """Evaluation questions minus any whose (task, question text) is also a training question.

    Generated tasks draw from a finite space (chain_sum repeats about 2% of its problems across
    seeds); a score on a question the model trained on is not a test.
    """
    seen = {(ex.task, ex.question.strip()) for ex in train_examples}
    kept = [ex for ex in eval_examples if (ex.task, ex.question.strip()) not in seen]
    return kept, len(eval_examples) - len(kept)


class Evaluator:
    """Scores whatever weights the sampler pool holds, on ``examples``; finished evaluations are read back."""

    def __init__(self, cfg: Config, run_dir: Path, pool, tokenizer, logger: MetricsLogger, examples=None):
        self.cfg, self.out, self.pool, self.tokenizer, self.logger = cfg, Path(run_dir) / "eval", pool, tokenizer, logger
        self.examples = examples if examples is not None else load_slices(cfg.data.eval)
        self.results: List[EvalResult] = []

    def done(self, label: str) -> bool:
        return (self.out / f"{label}.json").is_file()

    def __call__(self, label: str) -> dict:
        t0 = time.perf_counter()
        tasks = train_tasks(self.cfg)
        if self.done(label):
            result = read_result(label, self.out, tasks, self.cfg.eval.bootstrap_samples)
        else:
            e = self.cfg.eval
            result = evaluate_with_pool(label, self.pool, self.tokenizer, self.examples, tasks, e.max_new_tokens,
                                        e.bootstrap_samples, e.pass_k, e.pass_k_temperature,
                                        self.cfg.logging.progress_bars)
            write_result(result, self.out)
            if self.pool.last_stats is not None:
                self.logger.log({"generated_tokens": self.pool.last_stats.generated_tokens,
                                 "tokens_per_s": self.pool.last_stats.tokens_per_s}, stage=f"eval/{label}/sampling")
        self.results = [r for r in self.results if r.label != label] + [result]
        metrics = {f"eval_{t}_accuracy": a.accuracy for t, a in result.per_task.items()}
        metrics.update({f"eval_{t}_pass_at_{self.cfg.eval.pass_k}": v for t, v in result.pass_at_k.items()})
        metrics.update(eval_in_domain_accuracy=result.in_domain.accuracy,
                       eval_out_of_domain_accuracy=result.out_of_domain.accuracy)
        self.logger.log({**metrics, "seconds": time.perf_counter() - t0}, stage=f"eval/{label}")
        print(f"eval {label}: in-domain {result.in_domain} | out-of-domain {result.out_of_domain}", flush=True)
        return metrics


def run_sft_stage(cfg: Config, run_dir: Path, config_file: Path) -> Path:
    sft_model = run_dir / "sft" / "model"
    if not (sft_model / "config.json").is_file():
        resolve_model_path(cfg.model.name_or_path)  # convert packaged models once, not in every learner
        run_learners(cfg.distributed.launcher, cfg.distributed.nproc_per_node, cfg.distributed.master_port,
                     ["sft", "--config", str(config_file)])
    return sft_model


def run_pipeline(cfg: Config, run_dir: Path, config_file: Path) -> List[EvalResult]:
    from selfrefine_dist.refine.driver import SelfRefineLoop
    from selfrefine_dist.refine.sync import load_folder_into_pool

    logger = MetricsLogger(run_dir, wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                           wandb_run_name=cfg.logging.wandb_run_name)
    seconds = {}
    # Bad data fails here, with the file named, before any stage starts.
    questions, eval_examples = load_slices(cfg.data.train), load_slices(cfg.data.eval)
    eval_examples, overlap = without_training_questions(eval_examples, questions)
    print(f"data: {len(questions)} training questions, {len(eval_examples)} evaluation questions"
          + (f" ({overlap} left out: the same question is in the training data)" if overlap else ""), flush=True)
    base_model = resolve_model_path(cfg.model.name_or_path)

    if cfg.teach.enabled:
        from selfrefine_dist.refine.teach import run_teach_stage

        t0 = time.perf_counter()
        run_teach_stage(cfg, run_dir)
        seconds["teach"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sft_model = str(run_sft_stage(cfg, run_dir, config_file))
    seconds["sft"] = time.perf_counter() - t0

    start_ray(cfg)
    t0 = time.perf_counter()
    pool = make_pool(cfg, sft_model)
    seconds["sampler_start"] = time.perf_counter() - t0
    evaluate = Evaluator(cfg, run_dir, pool, load_tokenizer(sft_model, cfg.model.trust_remote_code), logger,
                         eval_examples)
    bucket_bytes = cfg.refine.sync_bucket_mb << 20
    if cfg.eval.include_base:
        t0 = time.perf_counter()
        if not evaluate.done("base"):
            load_folder_into_pool(pool, base_model, version=-1, bucket_bytes=bucket_bytes)
        evaluate("base")
        seconds["eval_base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if pool.version != 0:
        load_folder_into_pool(pool, sft_model, version=0, bucket_bytes=bucket_bytes)
    evaluate("sft")
    seconds["eval_sft"] = time.perf_counter() - t0

    loop = SelfRefineLoop(cfg, run_dir, sft_model, questions, pool, logger, evaluate)
    t0 = time.perf_counter()
    try:
        loop.run()
    finally:
        loop.shutdown()
    seconds["rounds"] = time.perf_counter() - t0
    logger.log({f"{k}_s": v for k, v in seconds.items()}, stage="timing")

    results = evaluate.results
    table = comparison_table(results)
    (run_dir / "eval" / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {run_dir / 'eval'}", flush=True)
    from selfrefine_dist.report import write_report

    print(f"report: {write_report(run_dir)}", flush=True)
    logger.finish()
    return results


def run_eval_command(cfg: Config, run_dir: Path, model: str, label: str) -> EvalResult:
    """``selfrefine eval --model X``: one model on ``data.eval``, on a sampler pool of its own."""
    start_ray(cfg)
    pool = make_pool(cfg, model)
    evaluate = Evaluator(cfg, run_dir, pool, load_tokenizer(model, cfg.model.trust_remote_code),
                         MetricsLogger(run_dir, wandb_mode=cfg.logging.wandb_mode))
    evaluate(label)
    return evaluate.results[-1]
