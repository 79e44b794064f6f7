"""Benchmark the samplers: generated tokens per second, vLLM pool against the HF backend, side by side.

    python -m selfrefine_dist.benchmarks.sampling       # SmolLM2-135M fp32, 16 GSM prompts x 8 samples x 128 tokens

Both backends run the same way: one SamplerActor in Ray holding every CPU
(``--cpus``, default all), the whole set of prompts as one work item (vLLM
schedules it continuously; HF ``generate`` runs it as one padded batch of
prompts x samples). The backends run one after the other, never together. A
small warm-up call precedes the timed one; engine start is reported apart.
Tokens are generated tokens, end-of-sequence tokens included; each repeat uses
another seed, and the fastest repeat is reported.
"""
from __future__ import annotations

import argparse
import os
import time


def build_requests(model_path: str, prompts: int, samples: int):
    from selfrefine_dist.data.sft_dataset import render_prompt
    from selfrefine_dist.data.sources import load_examples
    from selfrefine_dist.data.tasks import get_task
    from selfrefine_dist.models.loading import load_tokenizer
    from selfrefine_dist.sampling.records import GenerationRequest

    tokenizer = load_tokenizer(model_path)
    task = get_task("gsm_symbolic")
    examples = load_examples("gsm_symbolic", "offline", "train", limit=prompts)
    return [GenerationRequest(key=ex.uid, prompt=render_prompt(tokenizer, task.user_prompt(ex, "cot")), n=samples)
            for ex in examples]


def measure(backend: str, model_path: str, requests, args) -> dict:
    from selfrefine_dist.config.schema import SamplerConfig
    from selfrefine_dist.sampling.pool import SamplerPool
    from selfrefine_dist.sampling.records import SamplingSettings

    cfg = SamplerConfig(backend=backend, num_actors=1, cpus_per_actor=args.cpus, chunk_size=len(requests),
                        hf_batch_size=len(requests), kv_cache_gib=args.kv_cache_gib, max_model_len=1024)
    start = time.perf_counter()
    pool = SamplerPool(cfg, model_path, args.dtype)
    start_s = time.perf_counter() - start
    try:
        pool.generate(requests[:2], SamplingSettings(args.temperature, args.top_p, 8, seed=-1), progress=False)
        best = None
        for repeat in range(args.repeats):
            settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens, seed=repeat)
            pool.generate(requests, settings, progress=False)
            stats = pool.last_stats
            print(f"  {backend} repeat {repeat}: {stats.generated_tokens} tokens in {stats.seconds:.1f} s "
                  f"({stats.tokens_per_s:.0f} tokens/s)", flush=True)
            if best is None or stats.tokens_per_s > best.tokens_per_s:
                best = stats
    finally:
        pool.shutdown()
    return {"backend": backend, "start_s": start_s, "stats": best}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray instance and the actor")
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM CPU KV cache (all samples fit at 4)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    import ray
    import torch

    from selfrefine_dist.models.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    requests = build_requests(model_path, args.prompts, args.samples)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure(backend, model_path, requests, args) for backend in args.backends]
    finally:
        ray.shutdown()

    print(f"\n# sampling benchmark: {args.model} {args.dtype}, {args.prompts} prompts x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens, temperature {args.temperature}, top_p {args.top_p}; "
          f"1 actor, {args.cpus} CPUs (torch {torch.__version__})\n")
    print("| backend | start s | generated tokens | seconds | tokens/s | vs hf |")
    print("|---|---:|---:|---:|---:|---:|")
    hf = next((r["stats"].tokens_per_s for r in rows if r["backend"] == "hf"), None)
    for row in rows:
        stats = row["stats"]
        ratio = f"{stats.tokens_per_s / hf:.2f}x" if hf else "n/a"
        print(f"| {row['backend']} | {row['start_s']:.1f} | {stats.generated_tokens} | {stats.seconds:.1f} | "
              f"{stats.tokens_per_s:.0f} | {ratio} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
