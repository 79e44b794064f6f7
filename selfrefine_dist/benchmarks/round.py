"""Benchmark self-refine rounds beside the same rounds scripted plainly with vLLM + TRL, one run.

    python -m selfrefine_dist.benchmarks.round        # SmolLM2-135M, 32 chain_sum questions x 4 paths, 2 rounds
    python -m selfrefine_dist.benchmarks.round --questions 64 --samples 8 --rounds 3

Both sides run the same rounds from the same model: the same questions, K paths per question, max
tokens, temperature, reward (``refine.reward``), pair strategy, DPO settings, micro-batch, DPO steps and
precision (``--dtype``; ``auto`` is bf16 where the CPU multiplies bf16 fast). A micro-batch runs as one
forward on both sides (``--pairs-per-forward``, default the micro-batch): TRL pads its pairs into one
batch, ours packs them side by side in one row (``models/segments.py``). Ours runs its CPU learner for
speed (``--cpu-memory fast``: freed memory kept for the next step, ``train/memory.py``). ``selfrefine``'s
own CPU defaults are one pair a forward and ``lean`` memory, for the lowest peak (``benchmarks/dpo.py``),
each ~1.2x the DPO step time on 2 cores:

* ``ours``   ``SelfRefineLoop`` in one driver process (``refine/driver.py``): a vLLM sampler actor and
             DeepSpeed learner actors in Ray that stay up across rounds; preference batches go to the
             learners through the object store, the new weights to the sampler the same way.
* ``plain``  what a user scripts without a framework, three steps a round, one after the other:
             1. a Python process builds ``vllm.LLM`` from the round's model folder and generates K paths
                per question (``LLM.generate`` with ``SamplingParams(n=K)``);
             2. the same reward and pair builder as ours, in plain Python (``score_paths``, ``build_pairs``);
             3. a Python process runs TRL's ``DPOTrainer`` (policy + reference loaded, reference log-probs
                precomputed, the steps) and ``save_model``: the folder the next round's engine loads.
             The TRL step trains on exactly as many pairs as ours did in that round (ours' DPO steps x
             global batch, the first of its own pairs; fewer if it built fewer: the table says so).

Ours runs first, then plain, never together. The wall time counts everything a user waits for, from
the command to the new weights where the next round samples: process and engine starts (Ray, vLLM,
learners; plain: every round), loading the questions and the tokenizer, sampling, rewards, pairs,
reference pass, DPO steps, export and sync. Before either side, an untimed warm-up process imports the
libraries both use and reads the model's files, so that neither side pays for a cold page cache that
the other then finds warm (on a 2-core AMD EPYC ours' first start took 46.7 s cold, 15.5 s warm;
``--no-warmup`` skips it).
Peak memory is the largest summed RSS of each side's process tree (Ray's own processes included), and the
largest summed PSS: RSS counts a shared page once per process that maps it (ours' weight sync puts 0.5 GiB
in the object store's shared memory, which the learner and the sampler both map), PSS once. The probe
polls RSS every 0.5 s and PSS every 5 s (``PROBE``), not the DPO bench's 0.1 s and 1 s: a PSS poll walks
the page tables of every process (``smaps_rollup``), which took 150 ms of CPU over ours' tree (learner,
sampler, Ray's own processes) on a 2-core AMD EPYC; at one a second the probe took a fifth of a core
from the side it measured, ours about twice what it took from plain's one process.
Prints the stage table per round and the ratios ours / plain (the target: <= 0.5x).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from selfrefine_dist.artifacts import read_jsonl
from selfrefine_dist.benchmarks.dpo import GIB, run_tree
from selfrefine_dist.benchmarks.sampling import VLLM_SCRIPT_ENGINE
from selfrefine_dist.benchmarks.scratch import scratch_dir

PROBE = {"interval_s": 0.5, "pss_every": 10}  # the memory probe's polls (see the module docstring)
STAGES = ("start", "sample", "reward + pairs", "reference pass", "DPO steps", "export + sync", "other")


def overrides_for(args, model_path: str, run_dir: Path) -> list[str]:
    """The round's settings, as config overrides (ours reads them; plain takes the same values from them)."""
    return [
        f"run.dir={run_dir}", "run.seed=0", f"model.name_or_path={model_path}", f"model.dtype={args.dtype}",
        f"data.train=[{{task: {args.task}, source: offline, split: train, limit: {args.questions}}}]",
        "data.max_len=1024",
        "sampler.backend=vllm", "sampler.num_actors=1", f"sampler.cpus_per_actor={args.cpus}",
        f"sampler.samples_per_question={args.samples}", "sampler.temperature=1.0", "sampler.top_p=1.0",
        f"sampler.max_new_tokens={args.max_new_tokens}", f"sampler.chunk_size={args.questions}",
        "sampler.max_model_len=512", f"sampler.kv_cache_gib={args.kv_cache_gib}", "sampler.seed=0",
        "dpo.beta=0.1", "dpo.rpo_alpha=null", f"dpo.lr={args.lr}", "dpo.epochs=1",
        f"dpo.micro_batch_size={args.micro_batch}", f"dpo.pairs_per_forward={args.pairs_per_forward or args.micro_batch}",
        "dpo.grad_accum=1", "dpo.warmup_steps=0",
        "dpo.lr_schedule=constant", "dpo.reference=sft", "dpo.adam_betas=[0.9,0.95]",
        f"refine.rounds={args.rounds}", f"refine.pair_strategy={args.pair_strategy}",
        f"refine.max_pairs_per_question={args.max_pairs_per_question}", "refine.reward=outcome",
        "refine.probe_questions=0", f"refine.num_learners={args.num_learners}", "refine.eval_every_round=false",
        f"distributed.zero_stage={args.zero_stage}", f"distributed.cpu_memory={args.cpu_memory}",
        f"ray.num_cpus={max(4, args.cpus + args.num_learners)}",
        "logging.wandb_mode=disabled", "logging.progress_bars=false",
    ]


# ---------------------------------------------------------------------------------------
# Ours: the driver's rounds (runs in its own process: --_ours SPEC)


def ours_main(spec: dict) -> None:
    from selfrefine_dist.config import load_config
    from selfrefine_dist.data.sources import load_slices
    from selfrefine_dist.models.loading import resolve_dtype
    from selfrefine_dist.pipeline import Samplers
    from selfrefine_dist.refine.driver import SelfRefineLoop
    from selfrefine_dist.stage_specs import base_model_identity
    from selfrefine_dist.stages import StageLedger, fingerprint
    from selfrefine_dist.tracking import MetricsLogger

    cfg = load_config(None, spec["overrides"])
    run_dir = Path(cfg.run.dir)
    model_fp = fingerprint(base_model_identity(cfg, resolve_dtype(cfg.model.dtype)))
    samplers = Samplers(cfg, cfg.model.name_or_path)
    loop = SelfRefineLoop(cfg, run_dir, cfg.model.name_or_path, model_fp, load_slices(cfg.data.train), samplers,
                          MetricsLogger(run_dir, wandb_mode="disabled"), StageLedger(run_dir))
    try:
        for r in range(1, cfg.refine.rounds + 1):
            summary = loop.run_round(r)
            with open(spec["rounds_file"], "a") as f:  # a file, not stdout: Ray's forwarded worker logs share it
                f.write(json.dumps({"done_at": time.time(),
                                    **{k: v for k, v in summary.items() if isinstance(v, (int, float))}}) + "\n")
    finally:
        loop.shutdown()
        samplers.shutdown()


def ours_stages(rounds: list[dict], started_at: float) -> list[dict]:
    """Seconds per stage of each of our rounds; "other" is the rest of the round's wall time (process
    start and imports in round 1, bookkeeping). "start": the sampler engines and learners started ahead of
    sampling (``start_s``), sampler engines started in the sample stage, the learners' load or the wait
    for it before training."""
    out, last = [], started_at
    for row in rounds:
        samplers_start = row.get("samplers_start_s", 0.0)
        start = row.get("start_s", 0.0) + samplers_start + row.get("learner_start_s", 0.0)
        reward = row.get("reward_s", 0.0)
        stages = {"start": start,
                  "sample": row["sample_s"] - reward - samplers_start,
                  "reward + pairs": reward + row["pair_s"], "reference pass": row.get("reference_logps_s", 0.0),
                  "DPO steps": row.get("dpo_s", 0.0) - row.get("reference_logps_s", 0.0),
                  "export + sync": row.get("export_s", 0.0) + row.get("sync_s", 0.0)}
        wall = row["done_at"] - last
        stages["other"] = wall - sum(stages.values())
        trained = row.get("pairs_kept", 0) - row.get("pairs_unused", 0)  # the pairs the DPO steps used
        out.append({"stages": stages, "wall_s": wall, "pairs": trained, "dpo_steps": row.get("dpo_steps", 0),
                    "sampled_tokens": row.get("sampled_tokens", 0),
                    "sample_accuracy": row.get("sample_accuracy", 0.0), "ray_start_s": row.get("ray_start_s", 0.0)})
        last = row["done_at"]
    return out


WARMUP = r"""
import importlib, json, os, sys, time
t0 = time.perf_counter()
for name in ("torch", "transformers", "vllm", "deepspeed", "ray", "trl"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            while fh.read(1 << 24):
                pass
print(f"warm-up: {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
"""


def warm_up(model_path: str, env: dict, timeout_s: float) -> None:
    """Import the libraries both sides use and read the model's files, untimed (see the module docstring)."""
    proc = subprocess.run([sys.executable, "-c", WARMUP, model_path], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"warm-up failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    print(proc.stdout.strip(), flush=True)


# ---------------------------------------------------------------------------------------
# Plain: vLLM in a script, the reward in Python, TRL in a script


PLAIN_SAMPLE = VLLM_SCRIPT_ENGINE + r"""
t0 = time.perf_counter()
params = SamplingParams(n=spec["samples"], temperature=spec["temperature"], top_p=spec["top_p"],
                        max_tokens=spec["max_new_tokens"])
out = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompt_ids"]], params, use_tqdm=False)
generate_s = time.perf_counter() - t0
texts = [[{"text": o.text, "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason or "length"}
          for o in r.outputs] for r in out]
with open(spec["out"], "w") as f:
    json.dump(texts, f)
print("RESULT " + json.dumps({"start_s": start_s, "generate_s": generate_s,
                              "tokens": sum(o["num_tokens"] for r in texts for o in r)}), flush=True)
"""


def result_line(proc: subprocess.CompletedProcess, what: str) -> dict:
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"plain {what} failed (exit {proc.returncode}):\n" + "\n".join(proc.stdout.splitlines()[-20:]))
    return json.loads(line[len("RESULT "):])


def plain_rounds(cfg, model_path: str, ours_rounds: list[dict], work: Path, args, env: dict) -> tuple[list[dict], int]:
    """The same rounds as three plain steps each; returns the rounds' stage seconds and the peak RSS.
    Loading the questions and the tokenizer and rendering the prompts count in round 1 ("other"), as
    ours' do."""
    t_prepare = time.perf_counter()
    from selfrefine_dist.data.sft_dataset import render_prompt
    from selfrefine_dist.data.sources import load_slices
    from selfrefine_dist.data.tasks import get_task
    from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype
    from selfrefine_dist.refine.pairs import build_pairs
    from selfrefine_dist.refine.scoring import score_paths
    from selfrefine_dist.sampling.records import GeneratedText

    questions = load_slices(cfg.data.train)
    tokenizer = load_tokenizer(model_path)
    prompts = {ex.uid: render_prompt(tokenizer, get_task(ex.task).user_prompt(ex, "cot")) for ex in questions}
    prompt_ids = [tokenizer(prompts[ex.uid], add_special_tokens=False)["input_ids"] for ex in questions]
    demonstrations = {ex.uid: get_task(ex.task).target_response(ex, "cot") for ex in questions if ex.rationale}
    dtype = resolve_dtype(cfg.model.dtype)
    global_batch = cfg.refine.num_learners * cfg.dpo.micro_batch_size * cfg.dpo.grad_accum
    rounds, peak, model = [], {"rss": 0, "pss": 0}, model_path
    for r, ours in enumerate(ours_rounds, 1):
        t_round = t_prepare if r == 1 else time.perf_counter()
        samples_file = work / f"plain_samples_{r}.json"
        spec = dict(model=model, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], cpus=args.cpus,
                    kv_cache_gib=cfg.sampler.kv_cache_gib, max_model_len=cfg.sampler.max_model_len,
                    seed=cfg.sampler.seed * 1000 + r, prompt_ids=prompt_ids, samples=cfg.sampler.samples_per_question,
                    temperature=cfg.sampler.temperature, top_p=cfg.sampler.top_p,
                    max_new_tokens=cfg.sampler.max_new_tokens, out=str(samples_file))
        t0 = time.perf_counter()
        run = run_tree([sys.executable, "-c", PLAIN_SAMPLE, json.dumps(spec)],
                       dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0"), args.timeout, **PROBE)
        sample_wall = time.perf_counter() - t0
        peak = {"rss": max(peak["rss"], run.peak_rss), "pss": max(peak["pss"], run.peak_pss)}
        sampled = result_line(run.proc, "sampling")

        t0 = time.perf_counter()
        texts = {ex.uid: [GeneratedText(**o) for o in outs]
                 for ex, outs in zip(questions, json.loads(samples_file.read_text()))}
        paths = score_paths(questions, texts, "cot", r - 1, reward=cfg.refine.reward)
        pairs, _ = build_pairs(questions, prompts, paths, cfg.refine.pair_strategy, cfg.refine.max_pairs_per_question,
                               seed=r, demonstrations=demonstrations)
        used = pairs[: ours["dpo_steps"] * global_batch]
        pairs_file = work / f"plain_pairs_{r}.jsonl"
        pairs_file.write_text("".join(json.dumps(p.as_dict()) + "\n" for p in used))
        reward_s = time.perf_counter() - t0

        folder = work / f"plain_model_{r}"
        train_spec = dict(model=model, pairs=str(pairs_file), micro_batch=cfg.dpo.micro_batch_size,
                          grad_accum=global_batch // cfg.dpo.micro_batch_size, epochs=cfg.dpo.epochs,
                          lr=cfg.dpo.lr, beta=cfg.dpo.beta, adam_beta2=cfg.dpo.adam_betas[1], threads=args.cpus,
                          dtype=dtype, out=str(work / f"plain_trainer_{r}"), save_to=str(folder))
        t0 = time.perf_counter()
        run = run_tree([sys.executable, "-m", "selfrefine_dist.benchmarks.dpo", "--_trl", json.dumps(train_spec)],
                       env, args.timeout, **PROBE)
        train_wall = time.perf_counter() - t0
        peak = {"rss": max(peak["rss"], run.peak_rss), "pss": max(peak["pss"], run.peak_pss)}
        trained = result_line(run.proc, "TRL training")
        # TRL tokenizes the pairs and precomputes the reference log-probs while its trainer is built (init_s)
        stages = {"start": sampled["start_s"] + (train_wall - trained["init_s"] - trained["train_s"] - trained["save_s"]),
                  "sample": sampled["generate_s"], "reward + pairs": reward_s,
                  "reference pass": trained["init_s"], "DPO steps": trained["train_s"],
                  "export + sync": trained["save_s"]}
        wall = time.perf_counter() - t_round
        stages["other"] = wall - sum(stages.values())
        rounds.append({"stages": stages, "wall_s": wall, "pairs": len(used), "dpo_steps": len(trained["step_s"]),
                       "sampled_tokens": sampled["tokens"],
                       "sample_accuracy": sum(p.correct for p in paths) / max(len(paths), 1)})
        model = str(folder)
    return rounds, peak


# ---------------------------------------------------------------------------------------


def memory(peak: dict) -> str:
    """A side's peak memory: summed RSS of its processes, and summed PSS (shared pages counted once)."""
    return f"peak RSS {peak['rss'] / GIB:.2f} GiB, peak PSS {peak['pss'] / GIB:.2f} GiB"


def table(ours: list[dict], plain: list[dict] | None, peaks: dict) -> str:
    """Stage seconds per round, side by side, and the ratios ours / plain."""
    head = ["stage"]
    for r in range(1, len(ours) + 1):
        head += [f"plain r{r} (s)", f"ours r{r} (s)"] if plain else [f"ours r{r} (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, get, fmt="{:.2f}"):
        cells = [name]
        for r, o in enumerate(ours):
            cells += ([fmt.format(get(plain[r])), fmt.format(get(o))] if plain else [fmt.format(get(o))])
        lines.append("| " + " | ".join(cells) + " |")

    for stage in STAGES:
        row(stage, lambda x, s=stage: x["stages"][s])
    row("**wall**", lambda x: x["wall_s"])
    row("pairs trained", lambda x: x["pairs"], "{}")
    row("optimizer steps", lambda x: x["dpo_steps"], "{}")
    row("sample accuracy", lambda x: x["sample_accuracy"], "{:.3f}")
    row("sampled tokens", lambda x: x["sampled_tokens"], "{}")
    row("sampling tokens/s", lambda x: x["sampled_tokens"] / max(x["stages"]["sample"], 1e-9), "{:.0f}")
    out = "\n".join(lines)
    total_ours = sum(o["wall_s"] for o in ours)
    out += f"\n\nours: {total_ours:.1f} s for {len(ours)} rounds, {memory(peaks['ours'])}"
    out += f"\nours' round-1 start: {ours[0]['stages']['start']:.2f} s, of which ray.init {ours[0]['ray_start_s']:.2f} s"
    if plain:
        total_plain = sum(p["wall_s"] for p in plain)
        out += (f"\nplain: {total_plain:.1f} s, {memory(peaks['plain'])}"
                f"\nratio ours / plain: wall {total_ours / total_plain:.2f}x (target <= 0.5x); per round "
                + ", ".join(f"r{r} {o['wall_s'] / p['wall_s']:.2f}x" for r, (o, p) in enumerate(zip(ours, plain), 1))
                + f"; peak RSS {peaks['ours']['rss'] / peaks['plain']['rss']:.2f}x, "
                  f"peak PSS {peaks['ours']['pss'] / peaks['plain']['pss']:.2f}x")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--task", default="chain_sum")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="K paths per question")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pair-strategy", default="teacher_vs_incorrect",
                        help="teacher_vs_incorrect (default) pairs even a model that gets few answers right")
    parser.add_argument("--max-pairs-per-question", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch and learner")
    parser.add_argument("--pairs-per-forward", type=int, default=None,
                        help="ours' pairs per forward (dpo.pairs_per_forward); default: the micro-batch, as TRL runs it")
    parser.add_argument("--cpu-memory", default="fast", choices=["fast", "lean"],
                        help="ours' distributed.cpu_memory (selfrefine's default: lean)")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--num-learners", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3],
                        help="0 for one learner (nothing to partition), 3 for several")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="threads of the samplers and TRL")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--ours-only", action="store_true", help="skip the plain side (it needs TRL: the bench extra)")
    parser.add_argument("--no-warmup", action="store_true", help="time both sides from whatever the page cache holds")
    parser.add_argument("--keep-work", action="store_true", help="keep the models and runs it wrote (removed by default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--_ours", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._ours:
        ours_main(json.loads(args._ours))
        return

    from selfrefine_dist.config import load_config
    from selfrefine_dist.models.loading import resolve_dtype, resolve_model_path

    model_path = resolve_model_path(args.model)
    work = scratch_dir("round_bench_", args.keep_work)
    overrides = overrides_for(args, model_path, work / "ours")
    cfg = load_config(None, overrides)
    print(f"# Round benchmark: {args.model} {resolve_dtype(args.dtype)}, {args.questions} {args.task} questions x "
          f"{args.samples} paths x {args.max_new_tokens} tokens, {args.pair_strategy} pairs, micro-batch "
          f"{args.micro_batch} ({args.pairs_per_forward or args.micro_batch} a forward, cpu_memory {args.cpu_memory}), "
          f"{args.num_learners} learner(s) ZeRO-{args.zero_stage}, {args.rounds} rounds, "
          f"{os.cpu_count()} cores")
    print(f"command: python -m selfrefine_dist.benchmarks.round {' '.join(argv if argv is not None else sys.argv[1:])}",
          flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")

    if not args.no_warmup:
        warm_up(model_path, env, args.timeout)
    started_at = time.time()
    rounds_file = work / "ours_rounds.jsonl"
    run = run_tree([sys.executable, "-m", "selfrefine_dist.benchmarks.round", "--_ours",
                    json.dumps({"overrides": overrides, "rounds_file": str(rounds_file)})], env,
                   args.timeout * args.rounds, **PROBE)
    rows = read_jsonl(rounds_file) if rounds_file.exists() else []
    if run.proc.returncode != 0 or len(rows) != args.rounds:
        raise RuntimeError(f"ours failed (exit {run.proc.returncode}):\n" + "\n".join(run.proc.stdout.splitlines()[-30:]))
    ours = ours_stages(rows, started_at)
    ours[-1]["wall_s"] += time.time() - started_at - sum(o["wall_s"] for o in ours)  # shutdown: the user waits too
    ours[-1]["stages"]["other"] = ours[-1]["wall_s"] - sum(v for k, v in ours[-1]["stages"].items() if k != "other")
    peaks = {"ours": {"rss": run.peak_rss, "pss": run.peak_pss}}
    print(f"  ours: {sum(o['wall_s'] for o in ours):.1f} s", file=sys.stderr, flush=True)

    plain = None
    if not args.ours_only:
        plain, peaks["plain"] = plain_rounds(cfg, model_path, ours, work, args, env)
    print(table(ours, plain, peaks), flush=True)


if __name__ == "__main__":
    main()
