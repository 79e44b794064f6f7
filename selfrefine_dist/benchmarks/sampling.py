"""Benchmark the samplers: generated tokens per second of our sampler pool (vLLM and HF backends) beside
the peer, raw vLLM (``vllm.LLM.generate`` in one plain process), on the same prompts, side by side.

    python -m selfrefine_dist.benchmarks.sampling       # SmolLM2-135M fp32, 16 GSM prompts x 8 samples x 128 tokens

``raw_vllm``: a subprocess with no Ray that builds ``vllm.LLM`` with the engine settings our backend uses
(dtype, max_model_len, KV cache, eager mode on CPU, ``--cpus`` threads) and generates the same token ids
with ``SamplingParams(n=samples)``; it keeps vLLM's default KV block size (128 tokens on CPU), where ours
takes 32 so that a question's samples share more of its prompt (``sampling/vllm_backend.py``).
``vllm`` / ``hf``: one SamplerActor in Ray holding every CPU (``--cpus``, default all), the whole set of
prompts as one work item (vLLM schedules it continuously; HF ``generate`` runs it as one padded batch of
prompts x samples). The methods run one after the other, never together. A small warm-up call precedes
the timed ones; engine start is reported apart. Tokens are generated tokens, end-of-sequence tokens
included; each repeat draws other samples (ours: another seed; raw vLLM: its engine's generator moves
on), and the fastest repeat is reported.
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


# A plain script's vLLM engine (no Ray, no actor), its settings from the JSON in argv[1]: the peer of our
# samplers here and in benchmarks/round.py.
VLLM_SCRIPT_ENGINE = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_gib"])
os.environ["OMP_NUM_THREADS"] = str(spec["cpus"])
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
import torch
from vllm import LLM, SamplingParams
torch.set_num_threads(spec["cpus"])
t0 = time.perf_counter()
llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=spec["seed"],
          enforce_eager=not torch.cuda.is_available())
start_s = time.perf_counter() - t0
"""

RAW_VLLM = VLLM_SCRIPT_ENGINE + r"""
from vllm.inputs import TokensPrompt
prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompt_ids"]]
def run(n, max_tokens):
    # The engine's seed only: a per-request seed makes vLLM's CPU build fail ("CPU Generator does not use offset")
    params = SamplingParams(n=n, temperature=spec["temperature"], top_p=spec["top_p"], max_tokens=max_tokens)
    t = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.token_ids) for r in out for o in r.outputs), time.perf_counter() - t
run(spec["samples"], 8)  # warm-up
best = None
for repeat in range(spec["repeats"]):
    tokens, seconds = run(spec["samples"], spec["max_new_tokens"])
    print(f"  raw_vllm repeat {repeat}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s)", flush=True)
    if best is None or tokens / seconds > best[0] / best[1]:
        best = (tokens, seconds)
print("RESULT " + json.dumps({"start_s": start_s, "tokens": best[0], "seconds": best[1]}), flush=True)
"""


def measure_raw_vllm(model_path: str, requests, args) -> dict:
    """The peer: ``vllm.LLM.generate`` in a plain subprocess (no Ray, no actor), on the same token ids."""
    import json
    import subprocess
    import sys
    from types import SimpleNamespace

    from selfrefine_dist.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    prompt_ids = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in requests]
    spec = dict(model=model_path, dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype], max_model_len=1024,
                seed=0, kv_cache_gib=args.kv_cache_gib, cpus=args.cpus,
                prompt_ids=prompt_ids, samples=args.samples, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, repeats=args.repeats)
    out = subprocess.run([sys.executable, "-c", RAW_VLLM, json.dumps(spec)], capture_output=True, text=True,
                         env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=args.timeout)
    print("".join(line + "\n" for line in out.stdout.splitlines() if line.startswith("  raw_vllm")), end="", flush=True)
    result = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if out.returncode != 0 or result is None:
        raise RuntimeError(f"raw vLLM failed (exit {out.returncode}): {out.stderr[-3000:]}")
    r = json.loads(result[len("RESULT "):])
    stats = SimpleNamespace(generated_tokens=r["tokens"], seconds=r["seconds"], tokens_per_s=r["tokens"] / r["seconds"])
    return {"backend": "raw_vllm", "start_s": r["start_s"], "stats": stats}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--backends", nargs="+", default=["raw_vllm", "vllm", "hf"], choices=["raw_vllm", "vllm", "hf"])
    parser.add_argument("--timeout", type=int, default=1800, help="seconds for the raw vLLM subprocess")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray instance and the actor")
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM CPU KV cache (all samples fit at 4)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    import ray
    import torch

    from selfrefine_dist.models.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    requests = build_requests(model_path, args.prompts, args.samples)
    rows = []
    if "raw_vllm" in args.backends:  # first, before Ray holds any CPU
        rows.append(measure_raw_vllm(model_path, requests, args))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        rows += [measure(backend, model_path, requests, args) for backend in args.backends if backend != "raw_vllm"]
    finally:
        ray.shutdown()

    print(f"\n# sampling benchmark: {args.model} {args.dtype}, {args.prompts} prompts x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens, temperature {args.temperature}, top_p {args.top_p}; "
          f"1 actor, {args.cpus} CPUs (torch {torch.__version__})\n")
    print("| method | start s | generated tokens | seconds | tokens/s | vs raw vLLM |")
    print("|---|---:|---:|---:|---:|---:|")
    raw = next((r["stats"].tokens_per_s for r in rows if r["backend"] == "raw_vllm"), None)
    for row in rows:
        stats = row["stats"]
        ratio = f"{stats.tokens_per_s / raw:.2f}x" if raw else "n/a"
        print(f"| {row['backend']} | {row['start_s']:.1f} | {stats.generated_tokens} | {stats.seconds:.1f} | "
              f"{stats.tokens_per_s:.0f} | {ratio} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
