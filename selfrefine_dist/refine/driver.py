"""The self-refine rounds, each a short timed sequence:

    sample -> reward -> pair -> (reference log-probs + DPO on the learners) -> sync -> evaluate

A learner group that must load its policy (the first round, a rerun) starts as ``refine.learner_start``
says: with the sampler engines when the round starts them (both load at once; sampling waits for both,
so nothing shares the cores while it samples), or before the round samples (GPU learners: they load
while it samples), or after the round's pairs.

Every stage is fingerprinted (``selfrefine_dist/stages.py``, keys in ``stage_specs.py``): a rerun
reuses each stage whose inputs did not change, recomputes from the first one that did, and a
stage cut off half-way continues from its last finished artifact. Samples record the policy
version that made them: version 0 is the SFT model, version r the policy after round r. In the
asynchronous mode round r+1 is sampled with version r-1 while the learners train round r
(staleness 1); otherwise round r samples version r-1.

Each round's DPO is a fresh DPO run from the previous round's model (new optimizer state, its own
schedule), as in iterative DPO/RPO: a round depends only on that model, its pairs and the DPO keys,
so a driver started again continues from the exported folder, and a sweep can share rounds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional

import ray

from selfrefine_dist import artifacts
from selfrefine_dist.cluster import placement_line, start_ray
from selfrefine_dist.config import Config
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.sft_dataset import render_prompt
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype
from selfrefine_dist.refine.learner import learner_spec
from selfrefine_dist.refine.learner_group import LearnerDied, LearnerGroup
from selfrefine_dist.refine.pairs import build_pairs
from selfrefine_dist.refine.preference_data import plan_round, tokenize_pairs
from selfrefine_dist.refine.records import DPOStepMetrics, PreferencePair, ScoredPath, examples_digest
from selfrefine_dist.refine.reference_cache import load_tables, save_table
from selfrefine_dist.refine.scoring import sample_stats, score_paths
from selfrefine_dist.refine.sync import make_weight_sync
from selfrefine_dist.sampling.records import GenerationRequest, SamplingSettings
from selfrefine_dist.stage_specs import dpo_stage, examples_digest as questions_digest, pairs_stage, round_temperature
from selfrefine_dist.stage_specs import samples_stage
from selfrefine_dist.stages import Stage, StageLedger
from selfrefine_dist.tracking import MetricsLogger

DIRECT_MAX_NEW_TOKENS = 32  # a direct answer is one sentence
REFERENCE_TABLE = "reference_logps.json"  # a round's new frozen-reference log-probs (refine/reference_cache.py)


class SelfRefineLoop:
    """Runs ``cfg.refine.rounds`` rounds, starting from the SFT model.

    samplers: the sampler pool, started on first use (``pipeline.Samplers``).
    evaluate(label, model_fp, version, folder) / validate(...): score a model version and return
        its metrics (validate on ``data.validation``, to choose the best round).
    """

    def __init__(self, cfg: Config, run_dir: Path, sft_model: str, sft_fp: str, questions: List[ReasoningExample],
                 samplers, logger: MetricsLogger, ledger: StageLedger,
                 evaluate: Optional[Callable[..., dict]] = None, validate: Optional[Callable[..., dict]] = None):
        if not questions:
            raise ValueError("data.train: no training questions to sample")
        self.cfg, self.run_dir, self.sft_model = cfg, Path(run_dir), sft_model
        self.questions, self.samplers, self.logger, self.ledger = questions, samplers, logger, ledger
        self.evaluate, self.validate = evaluate, validate
        self.dtype = resolve_dtype(cfg.model.dtype)
        self._text: Optional[tuple] = None  # (tokenizer, CoT prompts, direct prompts): see ``text``
        self.model_fps: Dict[int, str] = {0: sft_fp}  # policy version -> fingerprint of its weights
        self.learners: Optional[LearnerGroup] = None
        self.learners_at: Optional[str] = None  # fingerprint of the weights the learner group holds
        self.weight_sync = make_weight_sync(cfg)  # learners -> samplers after each round's DPO
        start = cfg.refine.learner_start
        if start == "auto":
            start = "while_sampling" if cfg.refine.gpus_per_learner > 0 else "with_samplers"
        self.learner_start = start

    # ---- the policy's tokenizer and the questions' prompts -------------------------------
    def text(self) -> tuple:
        """(tokenizer, uid -> chat-rendered CoT prompt, uid -> direct prompt), built on first use. Loading
        the tokenizer is transformers' import (~4 s of one core on a 2-core CPU): ``start_learners`` has it
        done while the first engines and learners start, which leave a core idle."""
        if self._text is None:
            tok = load_tokenizer(self.sft_model, self.cfg.model.trust_remote_code)
            self._text = (tok, *({ex.uid: render_prompt(tok, get_task(ex.task).user_prompt(ex, style))
                                  for ex in self.questions} for style in ("cot", "direct")))
        return self._text

    @property
    def tokenizer(self):
        return self.text()[0]

    @property
    def prompts(self) -> Dict[str, str]:
        return self.text()[1]

    @property
    def direct_prompts(self) -> Dict[str, str]:
        return self.text()[2]

    # ---- the rounds ---------------------------------------------------------------------
    def run(self) -> List[dict]:
        return [self.run_round(r) for r in range(1, self.cfg.refine.rounds + 1)]

    def model_folder(self, version: int) -> str:
        return self.sft_model if version == 0 else str(artifacts.round_dir(self.run_dir, version) / "model")

    def run_round(self, r: int) -> dict:
        cfg, out = self.cfg, artifacts.round_dir(self.run_dir, r)
        seconds: Dict[str, float] = {}

        samples = self.samples_stage(r)
        pairs_st = pairs_stage(cfg, r, samples.fingerprint)
        dpo = dpo_stage(cfg, r, pairs_st.fingerprint, self.model_fps[r - 1], self.model_fps[0], self.dtype)
        samplers_were_up = self.samplers.started
        t0 = time.perf_counter()
        try:
            self.start_learners(r, samples, dpo)
        except LearnerDied as e:
            self.learner_died(e, r)
        seconds["start"] = time.perf_counter() - t0  # learners (and sampler engines) started ahead of sampling

        samplers_up = self.samplers.started
        t0 = time.perf_counter()
        paths, sample_metrics = self.samples(r, samples)  # sampling + rewards (or the files of an earlier run)
        seconds["sample"] = time.perf_counter() - t0
        if not samplers_up and self.samplers.started:
            seconds["samplers_start"] = self.samplers.start_s  # part of "sample": the engines started there
        if not samplers_were_up and self.samplers.started:
            seconds["ray_start"] = self.samplers.ray_start_s  # part of "start" or "sample": ray.init itself

        t0 = time.perf_counter()
        pairs, pair_metrics = self.pairs(r, paths, pairs_st)
        seconds["pair"] = time.perf_counter() - t0

        self.model_fps[r] = dpo.fingerprint
        summary_stage = Stage(f"round_{r:02d}/summary", {"dpo": dpo.fingerprint, "probe": cfg.refine.probe_questions,
                                                         "evaluated": self.evaluated(r)}, (f"rounds/round_{r:02d}/summary.json",))
        if self.ledger.is_done(summary_stage) and self.ledger.is_done(dpo):
            print(f"round {r}: done earlier ({out / 'summary.json'})", flush=True)
            return artifacts.read_json(out / "summary.json")

        try:
            history = self.train(r, pairs, pair_metrics, dpo, seconds)
        except LearnerDied as e:  # LearnerGroup.wait has stopped the group; the ledger says DPO "started"
            self.learner_died(e, r)

        eval_metrics = {}
        if self.evaluate is not None and self.evaluated(r):
            t0 = time.perf_counter()
            eval_metrics = self.evaluate(f"round_{r}", self.model_fps[r], r, self.model_folder(r))
            seconds["eval"] = time.perf_counter() - t0
        if self.validate is not None:
            t0 = time.perf_counter()
            eval_metrics.update({f"validation_{k[5:]}" if k.startswith("eval_") else k: v for k, v in
                                 self.validate(f"round_{r}", self.model_fps[r], r, self.model_folder(r)).items()})
            seconds["validate"] = time.perf_counter() - t0
        probe = {}
        if sample_metrics.get("probe_questions"):
            t0 = time.perf_counter()
            probe = {"probe_accuracy_after": self.probe(r, r)}
            seconds["probe"] = time.perf_counter() - t0

        last = history[-1].as_dict() if history else {}
        summary = {"round": r, **sample_metrics, **pair_metrics, **probe,
                   **{f"dpo_{k}": v for k, v in last.items() if isinstance(v, (int, float))},
                   "dpo_tokens_per_s": sum(h.tokens_per_s for h in history) / max(len(history), 1),
                   **{f"{k}_s": v for k, v in seconds.items()}, **eval_metrics}
        self.logger.log(summary, step=r, stage="round")
        self.ledger.started(summary_stage)
        artifacts.write_json(out / "summary.json", summary)
        self.ledger.finished(summary_stage)
        print(f"round {r}: sample acc {sample_metrics['sample_accuracy']:.3f} | pairs {pair_metrics['pairs_kept']} | "
              f"dpo loss {last.get('loss', float('nan')):.4f} margin {last.get('rewards/margins', float('nan')):.3f} | "
              + " ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
        return summary

    def learner_died(self, error: LearnerDied, r: int) -> NoReturn:
        """A rank died (``LearnerGroup.wait`` has stopped the group): the user's message, and how to go on."""
        self.learners = self.learners_at = None
        raise SystemExit(f"error: {error}. Run the same command again: it reuses the finished stages and redoes "
                         f"round {r}'s DPO from {self.model_folder(r - 1)}") from None

    def evaluated(self, r: int) -> bool:
        return self.cfg.refine.eval_every_round or r == self.cfg.refine.rounds

    # ---- DPO and weight sync --------------------------------------------------------------
    def train(self, r: int, pairs: List[PreferencePair], pair_metrics: dict, stage: Stage,
              seconds: Dict[str, float]) -> List[DPOStepMetrics]:
        """Round ``r``'s DPO from the previous round's model, export, and the new weights to the samplers."""
        cfg, out = self.cfg, artifacts.round_dir(self.run_dir, r)
        history_file = out / "dpo_metrics.jsonl"
        if self.ledger.prepare(stage) == "reuse":
            history = [DPOStepMetrics.from_dict(row) for row in artifacts.read_jsonl(history_file)]
            seconds["reference_logps"] = history[0].reference_s if history else 0.0
            return history
        self.ledger.started(stage)
        t0 = time.perf_counter()
        examples, too_long = tokenize_pairs(pairs, self.tokenizer, cfg.data.max_len)
        plan = plan_round(examples, cfg.refine.num_learners, cfg.dpo.micro_batch_size, cfg.dpo.grad_accum,
                          cfg.dpo.epochs, cfg.run.seed * 1000 + r)
        pair_metrics.update({f"dropped_pairs_{k}": v for k, v in too_long.items()}, pairs_unused=plan.unused,
                            dpo_steps=plan.steps)
        seconds["pair"] += time.perf_counter() - t0
        if plan.steps == 0:  # the round still ends (same weights, next version) so later rounds can run
            print(f"round {r}: WARNING {len(examples)} usable pairs do not fill one DPO batch of {plan.global_batch} "
                  f"(refine.num_learners x dpo.micro_batch_size x dpo.grad_accum): no DPO step this round; sample "
                  f"more questions (refine.questions_per_round) or paths (sampler.samples_per_question)", flush=True)

        t0 = time.perf_counter()
        learners = self.learner_group(r - 1)
        seconds["learner_start"] = time.perf_counter() - t0  # loading them, or waiting for a load started ahead
        t0 = time.perf_counter()
        # Preference batches travel to the learners through the object store.
        shard_refs = [ray.put(shard) for shard in plan.shards]
        train_refs = learners.train_round_async(shard_refs, r, self.known_reference_logps(r))
        if cfg.refine.mode == "async" and r < cfg.refine.rounds:
            self.samples(r + 1, self.samples_stage(r + 1))  # sampled with version r-1 while the learners train round r
        history = learners.wait(train_refs, "training")[0]
        expected = [examples_digest([ex for step in s for micro in step for ex in micro]) for s in plan.shards]
        if learners.digests() != expected:
            raise RuntimeError(f"round {r}: the pairs the learners received differ from the pairs built")
        artifacts.write_jsonl(history_file, [h.as_dict() for h in history])
        if cfg.dpo.reference == "sft":
            save_table(out / REFERENCE_TABLE, learners.computed_reference_logps(), self.model_fps[0], self.dtype)
        seconds["dpo"] = time.perf_counter() - t0
        seconds["reference_logps"] = history[0].reference_s if history else 0.0
        for i, h in enumerate(history):
            self.logger.log(h.as_dict(), step=i + 1, stage=f"dpo/round_{r}")

        timing = self.weight_sync.push(learners, self.samplers.pool, str(out / "model"), version=r)
        seconds["export"], seconds["sync"] = timing.export_s, timing.transfer_s
        self.learners_at = self.model_fps[r]
        self.ledger.finished(stage)
        return history

    def known_reference_logps(self, r: int) -> Optional[Dict[str, float]]:
        """Under the frozen SFT reference: the values rounds 1..r-1 computed (their saved tables), so that
        round r's reference pass runs the same sequences, in the same batches, in a run started again."""
        if self.cfg.dpo.reference != "sft":
            return None
        return load_tables([artifacts.round_dir(self.run_dir, i) / REFERENCE_TABLE for i in range(1, r)],
                           self.model_fps[0], self.dtype)

    def start_learners(self, r: int, samples: Stage, dpo: Stage) -> None:
        """Start round ``r``'s learners ahead of its DPO, as ``refine.learner_start`` says (see the module
        docstring). Learners that hold the round's policy already, or a DPO done earlier, need nothing."""
        if self.ledger.is_done(dpo) or self.learner_start == "after_pairs" or self.holds(r - 1):
            return
        if self.learner_start == "while_sampling":
            self.learner_group(r - 1, wait=False)  # they load their policy while the round samples
        elif not self.samplers.started and not self.ledger.is_done(samples):
            self.samplers.start()  # the sampler actors build their engines ...
            self.learner_group(r - 1, wait=False)  # ... while the learners load their policy
            self.text()  # ... and this process its tokenizer
            self.samplers.ready()
            self.learners.ready()  # sampling starts with nothing else on the cores

    def holds(self, version: int) -> bool:
        """Whether the running learner group holds policy ``version``."""
        return self.learners is not None and self.learners_at == self.model_fps[version]

    def learner_group(self, version: int, wait: bool = True) -> LearnerGroup:
        """Learners holding policy ``version``: the running group after it trained that version, else a new
        group loaded from the version's exported folder (a rerun, or a round reused from another run).
        ``wait=False`` returns while the ranks still build their engines (``LearnerGroup.ready`` waits)."""
        if not self.holds(version):
            r = self.cfg.refine
            spec = learner_spec(self.cfg, self.sft_model, r.num_learners, policy_path=self.model_folder(version))
            if self.learners is not None and self.learners.spec is None:  # the group that trained SFT, no policy
                print(f"dpo: on the {self.learners.world_size} learners that trained SFT", flush=True)
                self.learners.setup_async(spec)
            else:
                self.shutdown()
                start_ray(self.cfg)  # a rerun may need learners before any sampler: Ray with its configured CPUs
                self.learners = LearnerGroup(spec, r.num_learners, r.cpus_per_learner, r.gpus_per_learner,
                                             env=learner_env(r.num_learners), resources=self.cfg.ray.learner_resources,
                                             wait_for_setup=False)
                print("dpo: learners at " + placement_line("rank", self.learners.placement()), flush=True)
            self.learners_at = self.model_fps[version]
        if wait:
            self.learners.ready()
        return self.learners

    def adopt_learners(self, group: LearnerGroup) -> None:
        """Run the rounds on ``group`` (the ranks that trained SFT in this process, connected, no policy)."""
        self.shutdown()
        self.learners, self.learners_at = group, None

    # ---- sampling, rewards, pairs ---------------------------------------------------------
    def sampling_version(self, r: int) -> int:
        """The policy version that samples round ``r``."""
        return max(0, r - 2) if self.cfg.refine.mode == "async" else r - 1

    def round_questions(self, r: int) -> List[ReasoningExample]:
        """fresh: round r takes the next ``questions_per_round`` questions (wrapping around); same: the first ones."""
        n = self.cfg.refine.questions_per_round
        if not n or n >= len(self.questions):
            return list(self.questions)
        start = ((r - 1) * n) % len(self.questions) if self.cfg.refine.question_order == "fresh" else 0
        return [self.questions[(start + i) % len(self.questions)] for i in range(n)]

    def probe_questions(self, r: int) -> List[ReasoningExample]:
        return self.round_questions(r)[:self.cfg.refine.probe_questions]

    def samples_stage(self, r: int) -> Stage:
        version = self.sampling_version(r)
        return samples_stage(self.cfg, r, self.model_fps[version], questions_digest(self.round_questions(r)), self.dtype)

    def probe(self, r: int, version: int) -> float:
        """Greedy accuracy of policy ``version`` on round ``r``'s probe questions (the round's own questions)."""
        questions = self.probe_questions(r)
        self.samplers.ensure(version, self.model_folder(version))
        texts = self.samplers.pool.generate([GenerationRequest(ex.uid, self.prompts[ex.uid], 1) for ex in questions],
                                            SamplingSettings(0.0, 1.0, self.cfg.sampler.max_new_tokens, seed=0),
                                            progress=False)
        paths = score_paths(questions, texts, "cot", version, reward=self.cfg.refine.reward)
        return sum(p.correct for p in paths) / len(paths)

    def samples(self, r: int, stage: Stage):
        """Round ``r``'s scored paths: read back if sampled before with the same inputs, else sampled and scored now."""
        out = artifacts.round_dir(self.run_dir, r) / "samples.jsonl"
        report = out.with_name("sample_report.json")
        if self.ledger.prepare(stage) == "reuse":
            paths = [ScoredPath(**row) for row in artifacts.read_jsonl(out)]
            return paths, artifacts.read_json(report)
        self.ledger.started(stage)
        cfg, version = self.cfg.sampler, self.sampling_version(r)
        self.samplers.ensure(version, self.model_folder(version))
        questions = self.round_questions(r)
        settings = SamplingSettings(round_temperature(self.cfg, r), cfg.top_p, cfg.max_new_tokens, seed=cfg.seed * 1000 + r)
        progress = self.cfg.logging.progress_bars
        pool = self.samplers.pool
        texts = pool.generate([GenerationRequest(ex.uid, self.prompts[ex.uid], cfg.samples_per_question)
                               for ex in questions], settings, progress=progress)
        stats = pool.last_stats
        t0 = time.perf_counter()
        paths = score_paths(questions, texts, "cot", version, reward=self.cfg.refine.reward)
        reward_s = time.perf_counter() - t0
        if self.cfg.refine.pair_strategy == "cot_vs_direct":
            direct = pool.generate([GenerationRequest(ex.uid, self.direct_prompts[ex.uid], 1) for ex in questions],
                                   SamplingSettings(0.0, 1.0, DIRECT_MAX_NEW_TOKENS, seed=settings.seed),
                                   progress=progress)
            paths += score_paths(questions, direct, "direct", version)
        metrics = sample_stats([p for p in paths if p.style == "cot"]).as_metrics()
        metrics.update(sampled_by_version=version, sampling_temperature=settings.temperature,
                       sampled_tokens=stats.generated_tokens, sampling_tokens_per_s=stats.tokens_per_s,
                       sampling_s=stats.seconds, reward_s=reward_s,
                       retried_work_items=stats.retried_items, sampler_peak_rss_gib=pool.peak_rss_gib())
        if self.cfg.refine.probe_questions:
            metrics.update(probe_questions=len(self.probe_questions(r)), probe_accuracy_before=self.probe(r, version))
        artifacts.write_json(report, metrics)
        artifacts.write_jsonl(out, [p.as_dict() for p in paths])
        self.ledger.finished(stage)
        self.logger.log(metrics, step=r, stage="samples")
        return paths, metrics

    def pairs(self, r: int, paths: List[ScoredPath], stage: Stage):
        out = artifacts.round_dir(self.run_dir, r)
        if self.ledger.prepare(stage) == "reuse":
            pairs = [PreferencePair(**row) for row in artifacts.read_jsonl(out / "pairs.jsonl")]
            return pairs, artifacts.read_json(out / "pair_report.json")
        self.ledger.started(stage)
        uids = {p.uid for p in paths}
        questions = [ex for ex in self.questions if ex.uid in uids]
        demonstrations = None
        if self.cfg.refine.pair_strategy == "teacher_vs_incorrect":
            demonstrations = {ex.uid: get_task(ex.task).target_response(ex, "cot") for ex in questions if ex.rationale}
        pairs, report = build_pairs(questions, self.prompts, [p for p in paths if p.style == "cot"],
                                    self.cfg.refine.pair_strategy, self.cfg.refine.max_pairs_per_question,
                                    seed=self.cfg.run.seed * 1000 + r,
                                    direct_paths=[p for p in paths if p.style == "direct"], demonstrations=demonstrations)
        metrics = report.as_metrics()
        artifacts.write_json(out / "pair_report.json", metrics)
        artifacts.write_jsonl(out / "pairs.jsonl", [p.as_dict() for p in pairs])
        self.ledger.finished(stage)
        return pairs, metrics

    def shutdown(self) -> None:
        if self.learners is not None:
            self.learners.shutdown()
            self.learners = None
            self.learners_at = None


def learner_env(num_learners: int) -> Dict[str, str]:
    """Environment of learner actors: DeepSpeed's op cache outside the clone, the CPU accelerator off-GPU."""
    from selfrefine_dist.launch import learner_env as launcher_env

    keys = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    env = launcher_env(num_learners)
    return {k: env[k] for k in keys if k in env}
