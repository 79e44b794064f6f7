"""Which config keys and upstream stages each stage of ``selfrefine run`` depends on.

    model (base weights) ─┐
    data.train ───────────┴─> sft ─> eval/sft
                               └──> round_01/samples ─> round_01/pairs ─> round_01/dpo ─> eval/round_1
                                          (policy)                  (start, reference)
                                                   round_02/samples <─┘ ...

A key that no stage lists here (logging, progress bars, checkpoint cadence, ports, the number of
sampler actors) changes nothing that is computed, so changing it reuses every stage. The lists err
on the side of recomputing: anything that can change a number is in.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Optional, Sequence

from selfrefine_dist.config import Config
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.stages import Stage

# Keys of a section that do not change what a stage computes.
SFT_BOOKKEEPING = ("save_every", "keep_checkpoints", "log_every", "stop_at_step",
                   "examples_per_forward")  # how a step is computed, not what it computes


def examples_digest(examples: Sequence[ReasoningExample]) -> str:
    """sha256 (16 hex digits) over the examples' ids, texts, answers and rationales, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.uid, ex.task, ex.question, ex.answer, list(ex.choices), ex.rationale]).encode())
    return h.hexdigest()[:16]


def _section(obj, drop: Sequence[str] = ()) -> dict:
    return {k: v for k, v in asdict(obj).items() if k not in drop}


def base_model_identity(cfg: Config, dtype: str) -> dict:
    """The base weights: what ``model.*`` names, in the resolved dtype."""
    m = cfg.model
    return {"name_or_path": m.name_or_path, "revision": m.revision, "dtype": dtype}


def teach_stage(cfg: Config, train_digest: str) -> Stage:
    return Stage("teach", {"teach": _section(cfg.teach), "train_questions": train_digest,
                           "seed": cfg.run.seed}, ("teach",))


def sft_stage(cfg: Config, dtype: str, train_digest: str, teach_fp: Optional[str]) -> Stage:
    return Stage("sft", {
        "model": base_model_identity(cfg, dtype), "train_questions": train_digest, "teach": teach_fp,
        "data": {"train": [asdict(d) for d in cfg.data.train], "max_len": cfg.data.max_len,
                 "prompt_style": cfg.data.prompt_style},
        "sft": _section(cfg.sft, SFT_BOOKKEEPING), "world_size": cfg.distributed.nproc_per_node,
        "zero_stage": cfg.distributed.zero_stage, "seed": cfg.run.seed,
    }, ("sft",))


def eval_stage(cfg: Config, label: str, model_fp: str, questions_digest: str, dtype: str,
               split: str = "eval") -> Stage:
    """Greedy evaluation of the model ``model_fp`` on ``data.eval`` (or ``data.validation``)."""
    e, s = cfg.eval, cfg.sampler
    name = f"{split}/{label}"
    return Stage(name, {
        "model": model_fp, "questions": questions_digest, "dtype": dtype,
        "eval": {"max_new_tokens": e.max_new_tokens, "pass_k": e.pass_k, "pass_k_temperature": e.pass_k_temperature,
                 "bootstrap_samples": e.bootstrap_samples},
        "sampler": {"backend": s.backend, "max_model_len": s.max_model_len, "chunk_size": s.chunk_size},
        "train_tasks": sorted({d.task for d in cfg.data.train}),
    }, (f"{split}/{label}.json", f"{split}/{label}_samples.jsonl"))


def round_temperature(cfg: Config, r: int) -> float:
    """Round ``r``'s sampling temperature: ``sampler.temperature_schedule[r - 1]`` (the last repeats)."""
    schedule = cfg.sampler.temperature_schedule
    return schedule[min(r, len(schedule)) - 1] if schedule else cfg.sampler.temperature


def samples_stage(cfg: Config, r: int, policy_fp: str, questions_digest: str, dtype: str) -> Stage:
    s, rd = cfg.sampler, f"rounds/round_{r:02d}"
    return Stage(f"round_{r:02d}/samples", {
        "policy": policy_fp, "questions": questions_digest, "dtype": dtype,
        "sampler": {"backend": s.backend, "samples_per_question": s.samples_per_question,
                    "temperature": round_temperature(cfg, r), "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
                    "seed": s.seed, "chunk_size": s.chunk_size, "max_model_len": s.max_model_len},
        "direct_answers": cfg.refine.pair_strategy == "cot_vs_direct", "reward": cfg.refine.reward,
        "probe_questions": cfg.refine.probe_questions,
    }, (f"{rd}/samples.jsonl", f"{rd}/sample_report.json"))


def pairs_stage(cfg: Config, r: int, samples_fp: str) -> Stage:
    rf, rd = cfg.refine, f"rounds/round_{r:02d}"
    return Stage(f"round_{r:02d}/pairs", {
        "samples": samples_fp, "strategy": rf.pair_strategy, "max_pairs_per_question": rf.max_pairs_per_question,
        "seed": cfg.run.seed,
    }, (f"{rd}/pairs.jsonl", f"{rd}/pair_report.json"))


def dpo_stage(cfg: Config, r: int, pairs_fp: str, start_fp: str, sft_fp: str, dtype: str) -> Stage:
    """DPO of round ``r``: from the policy ``start_fp`` (the previous round's model) on the round's pairs."""
    d, rd = cfg.dpo, f"rounds/round_{r:02d}"
    reference = sft_fp if d.reference == "sft" else start_fp
    return Stage(f"round_{r:02d}/dpo", {
        "pairs": pairs_fp, "start": start_fp, "reference": reference, "dtype": dtype,
        "dpo": _section(d, ("pairs_file", "pairs_per_forward")), "num_learners": cfg.refine.num_learners,
        "zero_stage": cfg.distributed.zero_stage, "max_len": cfg.data.max_len, "seed": cfg.run.seed,
    }, (f"{rd}/dpo_metrics.jsonl", f"{rd}/model"))
