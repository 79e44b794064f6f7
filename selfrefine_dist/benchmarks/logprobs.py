"""Benchmark per-token log-probabilities: time and extra peak memory, forward and forward+backward.

    python -m selfrefine_dist.benchmarks.logprobs               # tokens {2048, 8192} x vocab {49152, 151936}
    python -m selfrefine_dist.benchmarks.logprobs --tokens 4096 --vocab 151936 --hidden 896   # the target case
    python -m selfrefine_dist.benchmarks.logprobs --device cuda # on a GPU (the Triton path)
    python -m selfrefine_dist.benchmarks.logprobs --device cuda --in-process --dtype bfloat16 float32 \
        --hidden 896 4096 --tokens 4096 16384 --modes hidden --budget-s 150 --json out.json   # gpu_check's grid

Prints markdown tables: one per mode, dtype and hidden size.

* From hidden states [T, H] and the lm_head weight [V, H] (what a learner does):
  ``naive`` (hidden @ W.T, log_softmax in fp32, gather), ``trl_selective`` (the same logits
  through TRL's ``selective_log_softmax``), ``trl_chunked`` (TRL's fused
  ``ChunkedLogProbFunction``), ``liger_dpo`` (Liger's ``LigerFusedLinearDPOLoss``, T tokens
  as pairs of chosen + rejected sequences of 1024 tokens, no reference model; it returns a
  DPO loss, not per-token log-probs), ``ours`` (``fused_linear_token_logprobs``),
  ``ours_nll`` (``fused_linear_nll_loss`` with the random weights fixed in advance, the SFT
  case: its value is the same weighted sum, its gradient made in the forward) and
  ``ours_dpo`` (``fused_linear_preference_loss`` with the same sigmoid DPO loss and pair
  layout as ``liger_dpo``: the like-for-like comparison with Liger).
* From given logits [T, V] fp32: ``naive``, ``trl_selective`` and ``ours`` (``token_logprobs``).

Each measurement runs in a fresh subprocess so that one method's allocations cannot hide
another's. Extra peak memory is the peak minus what the inputs already hold (the weight
gradient [V, H] counts: every method produces it). On CPU the peak is the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs just before the run); on CUDA it
is torch.cuda.max_memory_allocated. ``fwd s`` is the time to the log-probs (to the loss for
liger_dpo, ours_nll and ours_dpo, whose forwards also make their gradients, so that their
backward is ~0); ``fwd+bwd s`` includes the backward of sum(logprobs * random weights). A
small warm-up call (which also triggers Liger's torch.compile) precedes the timed one. On a shared machine use
``--rounds 2`` or more: cells are re-run in interleaved rounds and the fastest time kept.
Missing peers are listed as skipped with the reason; nothing is estimated.

``--in-process`` measures every cell in this process instead (on CUDA the peak counter is reset
per cell, so cells do not see each other's allocations; on CPU earlier cells can hide part of a
later one's RSS peak). ``--budget-s`` skips the cells left once that many seconds have passed
(listed as skipped). ``--json PATH`` writes every cell (with ``value``: the scalar that was
backpropagated, equal across methods of the same family up to rounding: naive, trl_*, ours
and ours_nll give sum(logprobs * weights); liger_dpo and ours_dpo the same DPO loss) and the
tables. Times and memory are also given as ratios to naive and to Liger's fused DPO loss.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

HIDDEN_METHODS = ("naive", "trl_selective", "trl_chunked", "liger_dpo", "ours", "ours_nll", "ours_dpo")
LOGITS_METHODS = ("naive", "trl_selective", "ours")
LIGER_SEQUENCE_TOKENS = 1024
GIB = 1024**3


# ---------------------------------------------------------------------------------------
# The methods. Each builder returns run(inputs) -> (output, scalar_to_backprop) or raises
# ImportError when its package is missing.


def _hidden_method(name):
    import torch

    from selfrefine_dist.kernels import fused_linear_token_logprobs, naive_linear_token_logprobs

    def weighted(logprobs, upstream):
        return logprobs, (logprobs * upstream).sum()

    if name == "naive":
        return lambda h, w, t, u: weighted(naive_linear_token_logprobs(h, w, t), u)
    if name == "ours":
        return lambda h, w, t, u: weighted(fused_linear_token_logprobs(h, w, t), u)
    if name == "trl_selective":
        from trl.trainer.utils import selective_log_softmax

        return lambda h, w, t, u: weighted(selective_log_softmax(h @ w.t(), t), u)
    if name == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction

        def trl_chunked(h, w, t, u):
            # TRL's defaults from add_fused_lm_head: 32768-wide vocabulary tiles, log-probs only.
            return weighted(ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, None, 1.0, ())[0], u)

        return trl_chunked
    if name == "liger_dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger_loss = LigerFusedLinearDPOLoss(use_ref_model=False, compiled=True)

        def liger_dpo(h, w, t, u):
            # [T, H] -> [2 * pairs, L, H]: chosen sequences first, then rejected (Liger's layout).
            length = min(LIGER_SEQUENCE_TOKENS, h.shape[0] // 2)
            out = liger_loss(w, h.view(-1, length, h.shape[1]), t.view(-1, length))
            loss = out[0] if isinstance(out, tuple) else out
            return loss, loss

        return liger_dpo
    if name == "ours_nll":
        from selfrefine_dist.kernels import fused_linear_nll_loss

        def ours_nll(h, w, t, u):
            loss = fused_linear_nll_loss(h, w, t, -u)  # = sum(u * logp), the scalar the others backpropagate
            return loss, loss

        return ours_nll
    if name == "ours_dpo":
        from selfrefine_dist.kernels import fused_linear_preference_loss
        from selfrefine_dist.losses import dpo_loss

        def ours_dpo(h, w, t, u):
            length = min(LIGER_SEQUENCE_TOKENS, h.shape[0] // 2)
            hidden, targets = h.view(-1, length, h.shape[1]), t.view(-1, length)
            pairs = hidden.shape[0] // 2
            no_reference = torch.zeros(pairs)  # as Liger's use_ref_model=False

            def pair_loss(chosen, rejected):
                return dpo_loss(chosen, rejected, no_reference.to(chosen), no_reference.to(chosen), beta=0.1).loss

            loss, _ = fused_linear_preference_loss(hidden, w, targets, pair_loss)
            return loss, loss

        return ours_dpo
    raise ValueError(f"unknown method {name!r}")


def _logits_method(name):
    from selfrefine_dist.kernels import naive_token_logprobs, token_logprobs

    def weighted(logprobs, upstream):
        return logprobs, (logprobs * upstream).sum()

    if name == "naive":
        return lambda x, t, u: weighted(naive_token_logprobs(x, t), u)
    if name == "ours":
        return lambda x, t, u: weighted(token_logprobs(x, t), u)
    if name == "trl_selective":
        from trl.trainer.utils import selective_log_softmax

        return lambda x, t, u: weighted(selective_log_softmax(x, t), u)
    raise ValueError(f"unknown method {name!r}")


# ---------------------------------------------------------------------------------------
# Memory probes


class CpuPeakMemory:
    """Extra peak RSS since ``start()``: VmHWM, reset through /proc/self/clear_refs (Linux >= 4.0)."""

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets the peak RSS to the current RSS
        self.base = self._status_kib("VmRSS") * 1024

    def extra_peak(self):
        return self._status_kib("VmHWM") * 1024 - self.base


class CudaPeakMemory:
    """Extra peak of torch.cuda.max_memory_allocated since ``start()``."""

    def start(self):
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def extra_peak(self):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


# ---------------------------------------------------------------------------------------
# One measurement (runs in its own process)


def _measure(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    tokens, vocab, hidden_size = spec["tokens"], spec["vocab"], spec["hidden"]
    try:
        if spec["mode"] == "hidden":
            run = _hidden_method(spec["method"])
        else:
            run = _logits_method(spec["method"])
    except ImportError as error:
        return {"skipped": f"import failed: {error}"}

    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    # Prompt and padding positions of a real batch; every method receives the same mask.
    targets[torch.rand(tokens, generator=gen) < spec["ignore_fraction"]] = -100
    targets = targets.to(device)
    upstream = torch.randn(tokens, generator=gen).to(device)
    if spec["mode"] == "hidden":
        weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device, dtype)
        hidden = torch.randn(tokens, hidden_size, generator=gen).to(device, dtype)
        weight.requires_grad_()
        hidden.requires_grad_()
        inputs, warmup_tokens = (hidden, weight), min(tokens, 2 * LIGER_SEQUENCE_TOKENS)
    else:
        logits = (torch.randn(tokens, vocab, generator=gen) * 2).to(device, dtype).requires_grad_()
        inputs, warmup_tokens = (logits,), min(tokens, 256)

    def call(n_tokens):
        first = inputs[0][:n_tokens] if n_tokens < tokens else inputs[0]
        return run(first, *inputs[1:], targets[:n_tokens], upstream[:n_tokens])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        # Warm-up: kernel compilation (Triton, Liger's torch.compile) stays out of the timing.
        _, scalar = call(warmup_tokens)
        scalar.backward()
        for tensor in inputs:
            tensor.grad = None
        del scalar
        probe = CudaPeakMemory() if device.type == "cuda" else CpuPeakMemory()
        fwd_times, total_times, peaks, values = [], [], [], []
        for _ in range(spec["repeats"]):
            probe.start()
            sync()
            start = time.perf_counter()
            _, scalar = call(tokens)
            sync()
            forward_done = time.perf_counter()
            scalar.backward()
            sync()
            end = time.perf_counter()
            peaks.append(probe.extra_peak())
            fwd_times.append(forward_done - start)
            total_times.append(end - start)
            values.append(float(scalar.detach()))
            del scalar
            for tensor in inputs:
                tensor.grad = None
    except Exception as error:  # a peer that does not run here is reported, not faked
        return {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    return {
        "fwd_s": sorted(fwd_times)[len(fwd_times) // 2],
        "fwdbwd_s": sorted(total_times)[len(total_times) // 2],
        "extra_peak_bytes": max(peaks),
        "value": values[-1],
    }


def _measure_in_process(spec: dict) -> dict:
    """``_measure`` here, then the cell's memory handed back so that the next cell starts clean."""
    result = _measure(spec)
    gc.collect()
    if spec["device"] == "cuda":
        import torch

        torch.cuda.empty_cache()
    return result


def _run_in_subprocess(spec: dict, timeout_s: float) -> dict:
    command = [sys.executable, "-m", "selfrefine_dist.benchmarks.logprobs", "--_measure", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"skipped": f"process failed (exit {proc.returncode}): {tail[:120]}"}


# ---------------------------------------------------------------------------------------
# Table


def _device_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _table(rows: list[dict], title: str) -> str:
    """One markdown table; ratio columns to naive, and to liger_dpo when that method was asked for."""
    peers = ["naive"] + (["liger_dpo"] if any(r["method"] == "liger_dpo" for r in rows) else [])
    names = {"naive": "naive", "liger_dpo": "Liger"}
    header = "| method | tokens | vocab | fwd s | fwd+bwd s | extra peak GiB |"
    header += "".join(f" memory vs {names[p]} | time vs {names[p]} |" for p in peers)
    lines = [f"\n### {title}\n", header, "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(peers)]
    bases = {p: {(r["tokens"], r["vocab"]): r for r in rows if r["method"] == p and "fwdbwd_s" in r} for p in peers}
    for r in rows:
        shape = f"| {r['method']} | {r['tokens']} | {r['vocab']} |"
        if "skipped" in r:
            lines.append(f"{shape} skipped: {r['skipped']} |" + " |" * (2 + 2 * len(peers)))
            continue
        line = f"{shape} {_seconds(r['fwd_s'])} | {_seconds(r['fwdbwd_s'])} | {r['extra_peak_bytes'] / GIB:.2f} |"
        for p in peers:
            base = bases[p].get((r["tokens"], r["vocab"]))
            memory_ratio = f"{r['extra_peak_bytes'] / base['extra_peak_bytes']:.3f}" if base and base["extra_peak_bytes"] > 0 else "n/a"
            time_ratio = f"{r['fwdbwd_s'] / base['fwdbwd_s']:.2f}" if base else "n/a"
            line += f" {memory_ratio} | {time_ratio} |"
        lines.append(line)
    return "\n".join(lines)


def _seconds(value: float) -> str:
    """Two decimals, or three significant digits below 0.1 s (GPU cells take milliseconds)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--hidden", type=int, nargs="+", default=[576],
                        help="576 (SmolLM2-135M), 896 (Qwen2.5-0.5B), 4096 (8B models); several: one table each")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                        help="several: one table each")
    parser.add_argument("--modes", nargs="+", choices=["hidden", "logits"], default=["hidden", "logits"])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods to run")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="fraction of targets set to -100 (prompt tokens); 0 is the worst case for ours")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh-process runs per cell, interleaved")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement before it is skipped")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every cell in this process (fast start; exact on CUDA, see above)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the cells left after this many seconds")
    parser.add_argument("--json", help="also write every cell and the tables to this file")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:
        print("RESULT " + json.dumps(_measure(json.loads(args._measure))), flush=True)
        return

    deadline = time.monotonic() + args.budget_s if args.budget_s is not None else None
    repeats = args.repeats or (5 if args.device == "cuda" else 1)
    device = _device_description(args.device)
    command = f"python -m selfrefine_dist.benchmarks.logprobs {' '.join(sys.argv[1:] if argv is None else argv)}"
    print(f"# log-prob benchmark on {device}")
    print(f"command: {command}")
    valid = "all targets valid" if args.ignore_fraction == 0 else f"{args.ignore_fraction:.0%} of targets ignored"
    where = "in this process" if args.in_process else "of fresh processes"
    print(f"{valid}; {args.rounds} round(s) {where} x {repeats} timed run(s): fastest time, largest peak")
    rows, tables = [], []
    for mode in args.modes:
        methods = HIDDEN_METHODS if mode == "hidden" else LOGITS_METHODS
        methods = [m for m in methods if args.methods is None or m in args.methods]
        for dtype in args.dtype:
            for hidden in (args.hidden if mode == "hidden" else args.hidden[:1]):  # logits: no hidden size
                cells = {(tokens, vocab, method): {"mode": mode, "dtype": dtype, "hidden": hidden, "method": method,
                                                   "tokens": tokens, "vocab": vocab}
                         for tokens in args.tokens for vocab in args.vocab for method in methods}
                # Rounds outermost, so that a burst of load from other work on a shared machine
                # hits one run of a cell, not all of them; the fastest run is the least disturbed.
                for round_index in range(args.rounds):
                    for (tokens, vocab, method), cell in cells.items():
                        spec = dict(mode=mode, method=method, tokens=tokens, vocab=vocab, hidden=hidden,
                                    device=args.device, dtype=dtype, repeats=repeats,
                                    ignore_fraction=args.ignore_fraction)
                        if deadline is not None and time.monotonic() > deadline:
                            result = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                        elif args.in_process:
                            result = _measure_in_process(spec)
                        else:
                            result = _run_in_subprocess(spec, args.timeout)
                        print(f"  round {round_index} {mode} {dtype} H={hidden} {method} T={tokens} V={vocab}: "
                              f"{result}", file=sys.stderr, flush=True)
                        _merge(cell, result)
                title = (f"From hidden states [T, {hidden}] and lm_head [V, {hidden}], {dtype}" if mode == "hidden"
                         else f"From given logits [T, V], {dtype}")
                tables.append(_table(list(cells.values()), title))
                print(tables[-1], flush=True)
                rows.extend(cells.values())
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": device, "command": command, "repeats": repeats, "rows": rows,
                       "markdown": "\n".join(tables)}, out, indent=1)


def _merge(cell: dict, result: dict) -> None:
    """Fold one run into a table cell: fastest times, largest peak; skipped only if never measured."""
    if "skipped" in result:
        if "fwdbwd_s" not in cell:
            cell["skipped"] = result["skipped"]
        return
    cell.pop("skipped", None)
    for key in ("fwd_s", "fwdbwd_s"):
        cell[key] = min(cell.get(key, float("inf")), result[key])
    cell["extra_peak_bytes"] = max(cell.get("extra_peak_bytes", 0), result["extra_peak_bytes"])
    cell["value"] = result["value"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
