"""The whole method, stage by stage:

    teach (optional) -> SFT -> evaluate base and SFT -> self-refine rounds (evaluated) -> table, report

Every stage is fingerprinted (``stages.py``; the keys each depends on in ``stage_specs.py``): a rerun
reuses what did not change, recomputes from the first stage a change touches, and continues a stage
cut off half-way. SFT runs on the Ray learner group that then runs the DPO rounds
(``distributed.launcher: ray``), or on processes started by torchrun or the deepspeed launcher; sampling
and evaluation run on Ray sampler actors (a local Ray, or the cluster named by ``ray.address``). The
sampler pool starts on first use: a rerun that reuses everything starts no engine.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from selfrefine_dist import artifacts
from selfrefine_dist.cluster import placement_line, start_ray
from selfrefine_dist.config import Config
from selfrefine_dist.data.sources import load_slices
from selfrefine_dist.eval.evaluate import EvalResult, comparison_table, evaluate_with_pool, read_result, write_result
from selfrefine_dist.launch import run_learners
from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype, resolve_model_path
from selfrefine_dist.stage_specs import base_model_identity, eval_stage, examples_digest, sft_stage, teach_stage
from selfrefine_dist.stages import StageLedger, fingerprint
from selfrefine_dist.tracking import MetricsLogger, config_dict


def train_tasks(cfg: Config) -> List[str]:
    return sorted({ds.task for ds in cfg.data.train})


class Samplers:
    """The sampler pool, started on first use, and which model version it holds."""

    def __init__(self, cfg: Config, model_path: str, version: int = 0):
        self.cfg, self.model_path, self.first_version = cfg, model_path, version
        self._pool = None
        self._waited = False
        self._started_at = 0.0
        self.start_s = 0.0  # seconds from the start of the actors to their engines built
        self.ray_start_s = 0.0  # of those, the seconds ``ray.init`` took (0 where Ray was up already)

    @property
    def started(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        """Start the sampler actors and return while their engines load (``pool`` waits for them)."""
        if self._pool is None:
            from selfrefine_dist.sampling.pool import SamplerPool

            self._started_at = time.perf_counter()
            start_ray(self.cfg)
            self.ray_start_s = time.perf_counter() - self._started_at
            self._pool = SamplerPool(self.cfg.sampler, self.model_path, resolve_dtype(self.cfg.model.dtype),
                                     self.cfg.model.trust_remote_code, resources=self.cfg.ray.sampler_resources,
                                     wait_for_ready=False)
            self._pool.version = self.first_version
            self._waited = False

    def ready(self) -> None:
        """Wait for the engines ``start`` began building (starting them first if nobody did)."""
        self.start()
        if not self._waited:
            self._pool.ready()
            print("samplers at " + placement_line("actor", self._pool.placement()), flush=True)
            self.start_s = time.perf_counter() - self._started_at
            self._waited = True

    @property
    def pool(self):
        """The sampler pool, its engines built (started here on first use)."""
        self.ready()
        return self._pool

    def ensure(self, version: int, folder: str) -> None:
        """Bring the samplers to ``version`` from its exported folder when they hold another one."""
        from selfrefine_dist.refine.sync import load_folder_into_pool

        if self.pool.version != version:
            load_folder_into_pool(self.pool, folder, version, self.cfg.refine.sync_bucket_mb << 20)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def without_training_questions(eval_examples, train_examples):
    """Evaluation questions minus any whose (task, question text) is also a training question.

    Generated tasks draw from a finite space (chain_sum repeats about 2% of its problems across
    seeds); a score on a question the model trained on is not a test.
    """
    seen = {(ex.task, ex.question.strip()) for ex in train_examples}
    kept = [ex for ex in eval_examples if (ex.task, ex.question.strip()) not in seen]
    return kept, len(eval_examples) - len(kept)


class Evaluator:
    """Greedy evaluation of a model version on ``examples`` (``split``: "eval" or "validation"), one
    fingerprinted stage per model; finished evaluations are read back."""

    def __init__(self, cfg: Config, run_dir: Path, samplers: Samplers, tokenizer, logger: MetricsLogger,
                 ledger: StageLedger, examples, split: str = "eval"):
        self.cfg, self.out, self.samplers, self.tokenizer = cfg, Path(run_dir) / split, samplers, tokenizer
        self.logger, self.ledger, self.examples, self.split = logger, ledger, examples, split
        self.digest = examples_digest(examples)
        self.results: List[EvalResult] = []

    def __call__(self, label: str, model_fp: str, version: int, folder: str) -> dict:
        t0 = time.perf_counter()
        tasks = train_tasks(self.cfg)
        stage = eval_stage(self.cfg, label, model_fp, self.digest, resolve_dtype(self.cfg.model.dtype), self.split)
        if self.ledger.prepare(stage) == "reuse":
            result = read_result(label, self.out, tasks, self.cfg.eval.bootstrap_samples)
        else:
            self.ledger.started(stage)
            self.samplers.ensure(version, folder)
            e, pool = self.cfg.eval, self.samplers.pool
            result = evaluate_with_pool(label, pool, self.tokenizer, self.examples, tasks, e.max_new_tokens,
                                        e.bootstrap_samples, e.pass_k, e.pass_k_temperature,
                                        self.cfg.logging.progress_bars)
            write_result(result, self.out, tasks)
            self.ledger.finished(stage)
            if pool.last_stats is not None:
                self.logger.log({"generated_tokens": pool.last_stats.generated_tokens,
                                 "tokens_per_s": pool.last_stats.tokens_per_s}, stage=f"{self.split}/{label}/sampling")
        self.results = [r for r in self.results if r.label != label] + [result]
        metrics = {f"eval_{t}_accuracy": a.accuracy for t, a in result.per_task.items()}
        metrics.update({f"eval_{t}_pass_at_{self.cfg.eval.pass_k}": v for t, v in result.pass_at_k.items()})
        metrics.update(eval_in_domain_accuracy=result.in_domain.accuracy,
                       eval_out_of_domain_accuracy=result.out_of_domain.accuracy, eval_accuracy=pooled(result))
        self.logger.log({**metrics, "seconds": time.perf_counter() - t0}, stage=f"{self.split}/{label}")
        print(f"{self.split} {label}: in-domain {result.in_domain} | out-of-domain {result.out_of_domain}", flush=True)
        return metrics


def pooled(result: EvalResult) -> float:
    """Accuracy over every question of an evaluation."""
    rows = result.samples
    return sum(bool(r["correct"]) for r in rows) / len(rows) if rows else float("nan")


def choose_final(cfg: Config, run_dir: Path, validate: Optional[Evaluator]) -> dict:
    """The model a run reports: the best round on ``data.validation`` (``refine.select_best_round``; ties go to
    the earlier round, SFT included as round 0), else the last round. Written to ``<run>/final.json``."""
    rounds = cfg.refine.rounds
    if cfg.refine.select_best_round and validate is not None:
        scores = {0 if r.label == "sft" else int(r.label.split("_")[1]): pooled(r) for r in validate.results
                  if r.label == "sft" or r.label.startswith("round_")}
        best = max(sorted(scores), key=lambda r: scores[r])
        final = {"label": "sft" if best == 0 else f"round_{best}", "round": best,
                 "reason": f"best validation accuracy {scores[best]:.4f} of rounds "
                           + ", ".join(f"{r}: {scores[r]:.4f}" for r in sorted(scores))}
    else:
        final = {"label": f"round_{rounds}" if rounds else "sft", "round": rounds, "reason": "last round"}
    artifacts.write_json(Path(run_dir) / "final.json", final)
    return final


def run_sft_stage(cfg: Config, run_dir: Path, config_file: Path, ledger: StageLedger, stage):
    """(the SFT model folder, the Ray learner group that trained it or None). Reused, or trained on
    ``distributed.nproc_per_node`` learners: Ray actors (launcher ``ray``) or launcher processes."""
    sft_model = run_dir / "sft" / "model"
    group = None
    if ledger.prepare(stage) != "reuse":
        ledger.started(stage)
        resolve_model_path(cfg.model.name_or_path)  # convert packaged models once, not in every learner
        if cfg.distributed.launcher == "ray":
            group = sft_on_ray(cfg, run_dir, config_file)
        else:
            run_learners(cfg.distributed.launcher, cfg.distributed.nproc_per_node, cfg.distributed.master_port,
                         ["sft", "--config", str(config_file)])
        ledger.finished(stage)
    return sft_model, group


def sft_on_ray(cfg: Config, run_dir: Path, config_file: Path):
    """SFT on a new Ray learner group of ``distributed.nproc_per_node`` ranks (``refine``'s resources per
    rank); returns the group, connected, for the DPO rounds to use."""
    from selfrefine_dist.refine.driver import learner_env
    from selfrefine_dist.refine.learner import learner_threads
    from selfrefine_dist.refine.learner_group import LearnerDied, LearnerGroup

    start_ray(cfg)
    n, r = cfg.distributed.nproc_per_node, cfg.refine
    group = LearnerGroup(None, n, r.cpus_per_learner, r.gpus_per_learner, env=learner_env(n),
                         backend=cfg.distributed.backend, threads=learner_threads(n),
                         resources=cfg.ray.learner_resources)
    print(f"sft: on {n} Ray learners ({placement_line('rank', group.placement())})", flush=True)
    try:
        group.train_sft(str(config_file), str(run_dir))
    except LearnerDied as e:  # LearnerGroup.wait has stopped the group; the ledger says SFT "started"
        raise SystemExit(f"error: {e}. Run the same command again: SFT resumes from its last checkpoint in "
                         f"{run_dir / 'sft' / 'checkpoints'} (sft.save_every sets how often one is written)") from None
    except BaseException:
        group.shutdown()
        raise
    return group


def run_pipeline(cfg: Config, run_dir: Path, config_file: Path, logger: Optional[MetricsLogger] = None
                 ) -> List[EvalResult]:
    from selfrefine_dist.refine.driver import SelfRefineLoop

    own_logger = logger is None
    if logger is None:
        logger = MetricsLogger(run_dir, wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                               wandb_run_name=cfg.logging.wandb_run_name, config=config_dict(cfg))
    ledger = StageLedger(run_dir, cfg.run.reuse_from)
    seconds = {}
    # Bad data fails here, with the file named, before any stage starts.
    questions, eval_examples = load_slices(cfg.data.train), load_slices(cfg.data.eval)
    eval_examples, overlap = without_training_questions(eval_examples, questions)
    validation_examples, val_overlap = without_training_questions(load_slices(cfg.data.validation), questions)
    print(f"data: {len(questions)} training questions, {len(eval_examples)} evaluation questions"
          + (f" ({overlap} left out: the same question is in the training data)" if overlap else "")
          + (f", {len(validation_examples)} validation questions" if validation_examples else "")
          + (f" ({val_overlap} left out)" if val_overlap else ""), flush=True)
    dtype = resolve_dtype(cfg.model.dtype)
    train_digest = examples_digest(questions)

    teach_fp = None
    if cfg.teach.enabled:
        from selfrefine_dist.refine.teach import run_teach_stage

        t0 = time.perf_counter()
        stage = teach_stage(cfg, train_digest)
        if ledger.prepare(stage) != "reuse":
            ledger.started(stage)
            run_teach_stage(cfg, run_dir)
            ledger.finished(stage)
        teach_fp = stage.fingerprint
        seconds["teach"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sft = sft_stage(cfg, dtype, train_digest, teach_fp)
    logger.suspend()  # the SFT learners log into the same W&B run; one process may hold it at a time
    sft_folder, sft_learners = run_sft_stage(cfg, run_dir, config_file, ledger, sft)
    sft_model = str(sft_folder)
    seconds["sft"] = time.perf_counter() - t0

    samplers = Samplers(cfg, sft_model)
    tokenizer = load_tokenizer(sft_model, cfg.model.trust_remote_code)
    evaluate = Evaluator(cfg, run_dir, samplers, tokenizer, logger, ledger, eval_examples)
    validate = (Evaluator(cfg, run_dir, samplers, tokenizer, logger, ledger, validation_examples, "validation")
                if validation_examples else None)
    loop = SelfRefineLoop(cfg, run_dir, sft_model, sft.fingerprint, questions, samplers, logger, ledger,
                          evaluate, validate)
    if sft_learners is not None:  # the ranks that trained SFT run the rounds, when the layouts agree
        if cfg.refine.rounds and sft_learners.world_size == cfg.refine.num_learners:
            loop.adopt_learners(sft_learners)
        else:
            sft_learners.shutdown()
    try:
        if cfg.eval.include_base:
            t0 = time.perf_counter()
            base_fp = fingerprint(base_model_identity(cfg, dtype))
            evaluate("base", base_fp, -1, resolve_model_path(cfg.model.name_or_path))
            seconds["eval_base"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate("sft", sft.fingerprint, 0, sft_model)
        if validate is not None:
            validate("sft", sft.fingerprint, 0, sft_model)
        seconds["eval_sft"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loop.run()
        seconds["rounds"] = time.perf_counter() - t0
    finally:
        loop.shutdown()
        seconds["sampler_start"] = samplers.start_s
        samplers.shutdown()
    logger.log({f"{k}_s": v for k, v in seconds.items()}, stage="timing")

    final = choose_final(cfg, run_dir, validate)
    print(f"final model: {final['label']} ({final['reason']})", flush=True)
    results = evaluate.results
    table = comparison_table(results)
    (run_dir / "eval" / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {run_dir / 'eval'}", flush=True)
    from selfrefine_dist.report import write_report

    print(f"report: {write_report(run_dir)}", flush=True)
    if own_logger:
        logger.finish()
    return results


def folder_identity(model: str) -> dict:
    """A model folder as the files it holds now (name, size, modification time): new weights, new identity."""
    folder = Path(model)
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    return {"model": str(folder.resolve()) if folder.exists() else model,
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]}


def run_eval_command(cfg: Config, run_dir: Path, model: str, label: str) -> EvalResult:
    """``selfrefine eval --model X``: one model on ``data.eval``, on a sampler pool of its own."""
    samplers = Samplers(cfg, model)
    ledger = StageLedger(run_dir)
    logger = MetricsLogger(run_dir, wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                           wandb_run_name=cfg.logging.wandb_run_name, config=config_dict(cfg))
    evaluate = Evaluator(cfg, run_dir, samplers, load_tokenizer(model, cfg.model.trust_remote_code), logger, ledger,
                         load_slices(cfg.data.eval))
    try:
        evaluate(label, fingerprint(folder_identity(model)), 0, model)
    finally:
        samplers.shutdown()
        logger.finish()
    return evaluate.results[-1]
