"""One prepared device check of the GPU path: every section timed, each within its own time budget.

    scripts/gpu_check.sh                                  # GPU machine: carried wheels, then this (< 8 min, H200)
    python -m selfrefine_dist.benchmarks.gpu_check        # the same, wheels already importable
    python -m selfrefine_dist.benchmarks.gpu_check --cpu  # dry run at toy sizes: gloo, Triton interpreted (CI)

Sections, in this order, each in a process of its own (its peak memory is its own; a crash or a
hang ends that section alone, killed at its budget):

  kernel_tests  pytest. CUDA: the ``gpu``-marked kernel tests, kernels compiled (no TRITON_INTERPRET).
                CPU: a few Triton-backend kernel tests under the interpreter.
  logprobs      ``benchmarks/logprobs.py`` in-process: naive, Liger's fused linear DPO loss, ours
                (per-token, NLL, fused DPO); time, peak memory, ratios to naive and to Liger. Each
                cell's backpropagated value is checked against naive's (per-token family) and Liger's
                (DPO loss).
  model         a random Qwen2 shaped like Qwen2.5-0.5B (toy sizes with --cpu) and a BPE tokenizer
                trained on synthetic words, saved to a folder (nothing is downloaded).
  sft           ZeRO-3 SFT steps: ``train/sft.build_engine`` and the fused NLL (``causal_nll_sum``);
                first checked against the model's own cross-entropy on the same batch.
  dpo           ``Learner`` in this process (no Ray): one step at learning rate 0 in each layout
                (fused loss on packed pairs, unfused packed, unfused two sequences per pair) must agree
                on the loss, the policy log-probs and the gradient norm, packed and two-sequence
                per-token log-probs too; then ``train_round`` (fused loss, packed pairs) for the figures.
  trl           TRL's DPOTrainer on the same pairs, for the throughput ratio (skipped without trl).
  sampling      ``sampling/hf_backend.HFBackend`` generate: tokens/s.

The training sections report tokens/s, model FLOPs utilisation against ``--peak-tflops``
(CUDA default: 989, the H200's dense bf16 peak; CPU default: a bf16/fp32 matmul measured in the
model section) and peak memory (CUDA: max allocated; CPU: peak RSS). Writes ``summary.json``,
``summary.md`` and ``sections.log`` into ``--out`` (default ``$OUT``, else ``gpu_check_out/``).
Exit status 1 when a correctness check fails or a required section does not finish; TRL and
Liger are peers: missing, they are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
H200_BF16_DENSE_TFLOPS = 989.0
SECTIONS = ("kernel_tests", "logprobs", "model", "sft", "dpo", "trl", "sampling")
PEER_SECTIONS = ("trl",)  # a comparison, not our code: its failure is reported, not fatal
NEEDS_MODEL = ("sft", "dpo", "trl", "sampling")


@dataclass(frozen=True)
class Profile:
    """Sizes and time budgets of one run: ``CUDA_PROFILE`` on a GPU, ``CPU_PROFILE`` for the dry run."""

    device: str  # "cuda" or "cpu"
    dtype: str  # training and sampling dtype: "bf16" or "fp32" ("auto": resolved on the machine)
    model: Dict[str, int]  # transformers.Qwen2Config sizes
    tokenizer_vocab: int
    kernel_tests: Tuple[str, ...]  # pytest arguments
    logprobs: Tuple[str, ...]  # benchmarks/logprobs.py arguments (budget and output added)
    prompt_words: int  # synthetic prompt and response lengths, in words (about a token each on GPU)
    response_words: int
    micro_batch: int  # SFT sequences / DPO pairs per step
    steps: int
    sample_prompts: int
    sample_n: int
    sample_new_tokens: int
    budgets: Dict[str, float] = field(default_factory=dict)  # seconds per section


QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)

CUDA_PROFILE = Profile(
    device="cuda", dtype="bf16", model=QWEN25_05B, tokenizer_vocab=4096,
    kernel_tests=("tests/kernels", "-m", "gpu"),
    logprobs=("--device", "cuda", "--in-process", "--modes", "hidden", "--dtype", "bfloat16", "float32",
              "--hidden", "896", "4096", "--tokens", "4096", "16384", "--vocab", "49152", "151936",
              "--methods", "naive", "liger_dpo", "ours", "ours_nll", "ours_dpo", "--repeats", "3"),
    prompt_words=256, response_words=384, micro_batch=8, steps=8,
    sample_prompts=32, sample_n=4, sample_new_tokens=256,
    # 460 s in all: with the wheel install, under 8 minutes on an H200. The log-prob grid runs bf16
    # first; cells left when its budget is spent (Liger recompiles per dtype and size) are listed skipped.
    budgets=dict(kernel_tests=60, logprobs=150, model=30, sft=65, dpo=70, trl=45, sampling=40),
)
CPU_PROFILE = Profile(
    device="cpu", dtype="auto",
    model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
               num_key_value_heads=1, max_position_embeddings=1024),
    tokenizer_vocab=512,
    # Not tests/kernels as a whole: its ZeRO-3 module imports DeepSpeed just to be collected.
    kernel_tests=("tests/kernels/test_token_logprobs.py", "tests/kernels/test_fused_linear_nll.py",
                  "tests/kernels/test_fused_linear_preference.py", "-m", "not slow and not gpu",
                  "-k", "triton and (both_backends or extreme)"),
    logprobs=("--device", "cpu", "--in-process", "--modes", "hidden", "--dtype", "float32", "bfloat16",
              "--hidden", "64", "--tokens", "64", "--vocab", "512",
              "--methods", "naive", "liger_dpo", "ours", "ours_nll", "ours_dpo"),
    prompt_words=12, response_words=20, micro_batch=2, steps=3,
    sample_prompts=4, sample_n=2, sample_new_tokens=16,
    # About 90 s in all on 2 quiet cores with DeepSpeed's CPU op cached; the budgets leave room for
    # its first build (~35 s quiet, minutes on a loaded machine) and for shared machines.
    budgets=dict(kernel_tests=120, logprobs=90, model=60, sft=300, dpo=300, trl=120, sampling=60),
)


# ---------------------------------------------------------------------------------------
# Synthetic data: words of made-up syllables, so that nothing is downloaded


def synthetic_words(count: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ven", "dor", "al", "is", "um", "ber", "qua", "zen"]
    words: List[str] = []
    seen = set()
    while len(words) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def synthetic_text(rng: random.Random, words: List[str], count: int) -> str:
    return " ".join(rng.choice(words) for _ in range(count))


def synthetic_pairs(tokenizer, profile: Profile, count: int, seed: int = 0) -> list:
    """PreferencePairs with chat-rendered prompts: chosen and rejected differ in text and final answer."""
    from selfrefine_dist.data.sft_dataset import render_prompt
    from selfrefine_dist.refine.records import PreferencePair

    rng, words = random.Random(seed), synthetic_words(profile.tokenizer_vocab // 2)
    pairs = []
    for i in range(count):
        prompt = render_prompt(tokenizer, f"Question {i}: {synthetic_text(rng, words, profile.prompt_words)}")
        chosen = f"{synthetic_text(rng, words, profile.response_words)} The answer is {i}."
        rejected = f"{synthetic_text(rng, words, profile.response_words)} The answer is {i + 7}."
        pairs.append(PreferencePair(f"synthetic-{i}", "synthetic", prompt, chosen, rejected, "cot_correct",
                                    "cot_incorrect"))
    return pairs


# ---------------------------------------------------------------------------------------
# Model FLOPs and memory


def train_flops(config, rows: List[Tuple[int, int]], head_tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward; no recomputation).

    rows: (tokens, attended query-key pairs) of every row the decoder runs; head_tokens: positions
    the lm_head projects. 2 FLOPs per multiply-add: 6 per weight and token for the linear layers,
    and 3 x 2 x 2 x (query-key pairs) x attention width per layer for QK^T and AV.
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn_width, kv_width = heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * attn_width * 2 + hidden * kv_width * 2 + 3 * hidden * config.intermediate_size
    decoder = config.num_hidden_layers * per_layer
    tokens = sum(t for t, _ in rows)
    attended = sum(a for _, a in rows)
    return (6.0 * decoder * tokens + 6.0 * config.vocab_size * hidden * head_tokens
            + 12.0 * config.num_hidden_layers * attn_width * attended)


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def packed_pair_row(ex) -> Tuple[int, int]:
    """A packed pair's row: prompt + chosen causal, rejected tokens see the prompt and themselves."""
    p, c, r = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    return p + c + r, causal_pairs(p + c) + r * p + causal_pairs(r)


def peak_probe(device: str):
    from selfrefine_dist.benchmarks.logprobs import CpuPeakMemory, CudaPeakMemory

    probe = CudaPeakMemory() if device == "cuda" else CpuPeakMemory()
    probe.start()
    return probe


def absolute_peak(probe) -> int:
    return probe.base + probe.extra_peak()


def measured_matmul_tflops(dtype, seconds: float = 0.5) -> float:
    """This CPU's square-matmul rate in ``dtype``: the MFU denominator of the dry run."""
    import torch

    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iterations += 1
    return 2 * 512**3 * iterations / (time.perf_counter() - start) / 1e12


def steady(values: List[float]) -> float:
    """Median over the steps after the first (compilation and allocator warm-up), or the only step."""
    return statistics.median(values[1:] if len(values) > 1 else values)


# ---------------------------------------------------------------------------------------
# Sections that run in their own process (python -m ... --_section NAME)


def section_model(profile: Profile, work: Path) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from selfrefine_dist.models.loading import DTYPES, resolve_dtype
    from selfrefine_dist.models.tiny import build_tiny_tokenizer

    dtype = resolve_dtype(profile.dtype)
    rng, words = random.Random(1), synthetic_words(profile.tokenizer_vocab // 2)
    corpus = [synthetic_text(rng, words, 40) for _ in range(2000)] + [f"The answer is {i}." for i in range(100)]
    tokenizer = build_tiny_tokenizer(work / "model", corpus, vocab_size=profile.tokenizer_vocab)
    config = Qwen2Config(**profile.model, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(profile.device):  # initialising 0.5B weights is quicker on the GPU
        model = Qwen2ForCausalLM(config)
    model.to(DTYPES[dtype]).save_pretrained(work / "model")
    ids = tokenizer(synthetic_text(rng, words, 100), add_special_tokens=False)["input_ids"]
    return {"path": str(work / "model"), "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": dtype, "tokenizer_vocab": len(tokenizer), "tokens_per_word": len(ids) / 100,
            "matmul_tflops": measured_matmul_tflops(DTYPES[dtype]) if profile.device == "cpu" else None}


def _single_process_world(backend: str) -> None:
    from selfrefine_dist.train import distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(dist.free_port()))
    dist.init_distributed(backend)


def section_sft(profile: Profile, work: Path) -> dict:
    import torch

    from selfrefine_dist.config.load import load_config
    from selfrefine_dist.data.sft_dataset import collate, tokenize_pair
    from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype
    from selfrefine_dist.models.logprobs import causal_nll_sum
    from selfrefine_dist.train.sft import build_engine

    backend = "nccl" if profile.device == "cuda" else "gloo"
    _single_process_world(backend)
    model_dir = str(work / "model")
    dtype = resolve_dtype(profile.dtype)
    cfg = load_config(overrides=[
        f"model.name_or_path={model_dir}", f"model.dtype={dtype}", f"distributed.backend={backend}",
        "distributed.zero_stage=3", f"sft.micro_batch_size={profile.micro_batch}", "sft.grad_accum=1",
        f"sft.max_steps={profile.steps}", "sft.lr=1.0e-5", "sft.lr_schedule=constant", "sft.warmup_steps=0",
    ])
    tokenizer = load_tokenizer(model_dir)
    rng, words = random.Random(2), synthetic_words(profile.tokenizer_vocab // 2)
    examples = [tokenize_pair(tokenizer, f"sft-{i}", f"Question {i}: {synthetic_text(rng, words, profile.prompt_words)}",
                              f"{synthetic_text(rng, words, 2 * profile.response_words)} The answer is {i}.")
                for i in range(profile.micro_batch * profile.steps)]
    probe = peak_probe(profile.device)
    engine, plan, total_steps = build_engine(cfg, len(examples))
    model_config = engine.module.config

    def batch_of(step):
        (indices,) = plan.micro_batches(step, 0)
        batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
        return {k: getattr(batch, k).to(engine.device) for k in ("input_ids", "attention_mask", "labels")}

    # Check: the fused NLL sum against the model's own cross-entropy (full logits) on the same batch.
    first = batch_of(0)
    engine.eval()
    with torch.no_grad():
        fused_sum = float(causal_nll_sum(engine, **first))
        own_mean = float(engine(**first, use_cache=False).loss)
    engine.train()
    response_tokens = int((first["labels"][:, 1:] != -100).sum())
    own_sum = own_mean * response_tokens

    steps = []
    for step in range(total_steps):
        batch = batch_of(step)
        tokens = int(batch["attention_mask"].sum())
        head_tokens = int((batch["labels"][:, 1:] != -100).sum())
        rows = [(int(n), causal_pairs(int(n))) for n in batch["attention_mask"].sum(-1)]
        if profile.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        nll = causal_nll_sum(engine, **batch)
        engine.backward(nll / head_tokens)  # world 1, no accumulation: the mean over response tokens
        engine.step()
        loss = nll.item() / head_tokens  # .item() waits for the step's kernels
        steps.append(dict(step_s=time.perf_counter() - start, loss=loss, tokens=tokens,
                          flops=train_flops(model_config, rows, head_tokens)))
    return _training_result(steps, absolute_peak(probe), dtype, checks=dict(
        fused_nll_sum=fused_sum, model_loss_sum=own_sum, response_tokens=response_tokens))


def section_dpo(profile: Profile, work: Path) -> dict:
    from selfrefine_dist.models.loading import resolve_dtype
    from selfrefine_dist.refine.learner import Learner, LearnerSpec
    from selfrefine_dist.refine.preference_data import plan_round, tokenize_pairs
    from selfrefine_dist.train.distributed import free_port

    dtype = resolve_dtype(profile.dtype)
    spec = LearnerSpec(
        policy_path=str(work / "model"), reference_path=None, dtype=dtype, trust_remote_code=False,
        backend="nccl" if profile.device == "cuda" else "gloo", zero_stage=3, offload_optimizer=False,
        micro_batch_size=profile.micro_batch, grad_accum=1, lr=5.0e-7, weight_decay=0.0, adam_betas=(0.9, 0.95),
        warmup_steps=0, lr_schedule="constant", max_grad_norm=1.0, gradient_checkpointing=False,
        lean_activations=True, beta=0.1,
        loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=None, average_log_prob=None, fused_loss=True,
        shared_prompt=True, seed=0, threads=os.cpu_count() or 1,
    )
    probe = peak_probe(profile.device)
    learner = Learner(rank=0, world_size=1, local_rank=0)
    learner.setup(spec, "127.0.0.1", free_port())
    pairs = synthetic_pairs(learner.tokenizer, profile, profile.micro_batch * profile.steps)
    examples, dropped = tokenize_pairs(pairs, learner.tokenizer, max_len=1 << 20)
    shard = plan_round(examples, 1, profile.micro_batch, 1, 1, seed=0).shards[0]
    checks = dpo_equality(learner, spec, shard[0])

    history = learner.train_round(shard, round_idx=1)
    model_config = learner.engine.module.config
    steps = []
    for metrics, micro_batches in zip(history, shard):
        step_examples = [ex for micro in micro_batches for ex in micro]
        rows = [packed_pair_row(ex) for ex in step_examples]
        head_tokens = sum(len(ex.chosen_ids) + len(ex.rejected_ids) for ex in step_examples)
        steps.append(dict(step_s=metrics.step_s, loss=metrics.loss,
                          tokens=sum(ex.num_tokens for ex in step_examples), packed_tokens=sum(t for t, _ in rows),
                          flops=train_flops(model_config, rows, head_tokens)))
    result = _training_result(steps, absolute_peak(probe), dtype, checks=checks)
    result.update(reference_s=history[0].reference_s, packed=history[0].shared_prompt, dropped=dropped)
    return result


def dpo_equality(learner, spec, step: list) -> dict:
    """The fused DPO loss on packed pairs against the unfused loss, packed and as two sequences per pair.

    ``step``: one optimizer step's micro-batches of examples. Each layout trains that one step through
    ``train_round`` at learning rate 0 (Adam's update and decay are zero, so the weights stay put),
    with the policy at the start of the round as the reference: every loss is log 2 when the policy's
    log-probs (with gradient: the fused kernel, or per-token log-probs) equal the reference pass's
    (no gradient, per-token log-probs); the policy log-probs and gradient norms must agree across
    layouts. Then, outside training, the per-token log-probs of packed rows against two sequences.
    """
    import torch

    from selfrefine_dist.kernels import fused_linear_token_logprobs
    from selfrefine_dist.refine.learner import head_inputs
    from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_pairs
    from selfrefine_dist.train.distributed import device

    layouts = dict(fused_packed=dict(fused_loss=True, shared_prompt=True),
                   unfused_packed=dict(fused_loss=False, shared_prompt=True),
                   unfused_unpacked=dict(fused_loss=False, shared_prompt=False))
    out = {"expected_loss": math.log(2)}
    try:
        for name, layout in layouts.items():
            learner.spec = replace(spec, lr=0.0, **layout)
            (metrics,) = learner.train_round([step], round_idx=0)
            out.update({f"{name}_loss": metrics.loss, f"{name}_grad_norm": metrics.grad_norm,
                        f"{name}_chosen_logps": metrics.logps_chosen,
                        f"{name}_rejected_logps": metrics.logps_rejected,
                        f"{name}_packed": metrics.shared_prompt})
    finally:
        learner.spec = spec

    engine, micro = learner.engine, step[0]
    pad = learner.tokenizer.pad_token_id

    def token_logps(batch):
        hidden, weight, targets = head_inputs(engine, batch, device())
        valid = targets != -100
        return fused_linear_token_logprobs(hidden, weight, targets).float()[valid]

    engine.eval()
    with torch.no_grad():
        packed_tokens = token_logps(collate_packed_pairs(micro, pad))
        unpacked_tokens = token_logps(collate_pairs(micro, pad))
    engine.train()
    out.update(token_count=int(packed_tokens.numel()), unpacked_token_count=int(unpacked_tokens.numel()),
               token_logp_mean_abs_diff=float((packed_tokens - unpacked_tokens).abs().mean()))
    return out


def _training_result(steps: List[dict], peak_bytes: int, dtype: str, checks: dict) -> dict:
    tokens_per_s = [s["tokens"] / s["step_s"] for s in steps]
    flops_per_s = [s["flops"] / s["step_s"] for s in steps]
    return dict(dtype=dtype, steps=steps, losses=[s["loss"] for s in steps],
                tokens_per_step=statistics.mean(s["tokens"] for s in steps),
                tokens_per_s=steady(tokens_per_s), model_tflops_per_s=steady(flops_per_s) / 1e12,
                peak_memory_gib=peak_bytes / GIB, checks=checks)


def section_trl(profile: Profile, work: Path) -> dict:
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError as error:
        return {"status": "skipped", "reason": f"TRL not importable here ({error})"}
    import torch

    from selfrefine_dist.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
    from selfrefine_dist.refine.preference_data import assistant_suffix, tokenize_pairs

    dtype = resolve_dtype(profile.dtype)
    model_dir = str(work / "model")
    tokenizer = load_tokenizer(model_dir)
    pairs = synthetic_pairs(tokenizer, profile, profile.micro_batch * profile.steps)
    examples, _ = tokenize_pairs(pairs, tokenizer, max_len=1 << 20)
    suffix = assistant_suffix(tokenizer)  # the responses end like ours: both train on the same text
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen + suffix, "rejected": p.rejected + suffix}
                                 for p in pairs])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if profile.device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if profile.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    probe = peak_probe(profile.device)
    model = load_causal_lm(model_dir, "fp32")  # fp32 weights, bf16 autocast: mixed precision like ours
    timer = StepTimer()
    args = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=profile.micro_batch, gradient_accumulation_steps=1,
        max_steps=profile.steps, learning_rate=5.0e-7, lr_scheduler_type="constant", beta=0.1,
        precompute_ref_log_probs=True, max_length=1 << 16, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=profile.device == "cpu", dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=dtype == "bf16",
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens_per_step = sum(ex.num_tokens for ex in examples) / len(examples) * profile.micro_batch
    return dict(version=trl.__version__, dtype=dtype, step_s=timer.times, losses=losses,
                tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_step / steady(timer.times),
                peak_memory_gib=absolute_peak(probe) / GIB)


def section_sampling(profile: Profile, work: Path) -> dict:
    from selfrefine_dist.data.sft_dataset import render_prompt
    from selfrefine_dist.models.loading import resolve_dtype
    from selfrefine_dist.sampling.hf_backend import HFBackend
    from selfrefine_dist.sampling.records import GenerationRequest, SamplingSettings

    dtype = resolve_dtype(profile.dtype)
    probe = peak_probe(profile.device)
    backend = HFBackend(str(work / "model"), dtype, batch_size=profile.sample_prompts)
    rng, words = random.Random(3), synthetic_words(profile.tokenizer_vocab // 2)
    requests = [GenerationRequest(f"q{i}", render_prompt(backend.tokenizer, synthetic_text(rng, words, profile.prompt_words)),
                                  profile.sample_n) for i in range(profile.sample_prompts)]
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=profile.sample_new_tokens, seed=0)
    backend.generate(requests[:1], replace(settings, max_new_tokens=4))  # warm-up: kernels, allocator
    start = time.perf_counter()
    outputs = backend.generate(requests, settings)
    seconds = time.perf_counter() - start
    generated = sum(o.num_tokens for completions in outputs for o in completions)
    return dict(dtype=dtype, sequences=sum(len(c) for c in outputs), generated_tokens=generated, generate_s=seconds,
                tokens_per_s=generated / seconds, peak_memory_gib=absolute_peak(probe) / GIB)


SECTION_FUNCTIONS = dict(model=section_model, sft=section_sft, dpo=section_dpo, trl=section_trl,
                         sampling=section_sampling)


# ---------------------------------------------------------------------------------------
# The driver: one process per section, each killed at its budget


def section_command(name: str, profile: Profile, work: Path, budget_s: float) -> List[str]:
    if name == "kernel_tests":
        return [sys.executable, "-m", "pytest", *profile.kernel_tests, "-q", "-p", "no:cacheprovider",
                f"--junitxml={work / 'kernel_tests.xml'}"]
    if name == "logprobs":
        # Cells stop being started at 75% of the budget, so the one under way can finish.
        return [sys.executable, "-m", "selfrefine_dist.benchmarks.logprobs", *profile.logprobs,
                "--budget-s", f"{0.75 * budget_s:.0f}", "--json", str(work / "logprobs.json")]
    return [sys.executable, "-m", "selfrefine_dist.benchmarks.gpu_check", "--_section", name,
            "--_profile", json.dumps(asdict(profile)), "--_work", str(work)]


def section_env(profile: Profile) -> Dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if profile.device == "cuda":  # compiled kernels, DeepSpeed's CUDA accelerator
        env.pop("TRITON_INTERPRET", None)
        env.pop("DS_ACCELERATOR", None)
    else:  # the dry run stays on the CPU even where a GPU is present
        env.update(TRITON_INTERPRET="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run_section(name: str, profile: Profile, work: Path, log) -> dict:
    budget = profile.budgets[name]
    command = section_command(name, profile, work, budget)
    log.write(f"\n===== {name} (budget {budget:.0f} s): {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    # A session of its own, so that a timeout ends the section's children too (pytest, compile workers).
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=section_env(profile), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        returncode = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        # SIGTERM first: a section exits through its finally blocks (torch releases the lock of a
        # just-in-time build there; killed outright, it would leave every later build waiting).
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        returncode = None
    seconds = time.perf_counter() - start
    if name == "kernel_tests":
        record = dict(junit_counts(work / "kernel_tests.xml"), returncode=returncode)
        ok = returncode == 0
    else:
        path = work / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        ok = returncode == 0 and path.exists()
    record.update(seconds=seconds, budget_s=budget)
    if returncode is None:
        record["status"] = "timed_out"
    elif "status" not in record:
        record["status"] = "ok" if ok else "failed"
    print(f"{name}: {record['status']} in {seconds:.0f} s (budget {budget:.0f} s)", flush=True)
    return record


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return dict(tests=0, failed=0, skipped=0, passed=0)
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return dict(tests=total["tests"], failed=failed, skipped=total["skipped"],
                passed=total["tests"] - failed - total["skipped"])


# ---------------------------------------------------------------------------------------
# Checks and report


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def evaluate(results: Dict[str, dict], profile: Profile) -> List[Check]:
    bf16 = profile.device == "cuda" or results.get("model", {}).get("dtype") == "bf16"
    checks: List[Check] = []
    for name, record in results.items():
        if name not in PEER_SECTIONS:
            checks.append(Check(f"{name} finished", record["status"] == "ok",
                                f"{record['status']} in {record['seconds']:.0f} s of {record['budget_s']:.0f}"))
    kernel = results.get("kernel_tests")
    if kernel is not None:
        checks.append(Check("kernel tests pass", kernel["status"] == "ok" and kernel["failed"] == 0
                            and kernel["passed"] > 0,
                            f"{kernel['passed']} passed, {kernel['failed']} failed, {kernel['skipped']} skipped"))
    if results.get("logprobs", {}).get("rows"):
        checks.extend(logprob_checks(results["logprobs"]["rows"]))
    sft = results.get("sft", {})
    if sft.get("status") == "ok":
        c = sft["checks"]
        tolerance = (2e-2 if bf16 else 1e-4) * c["response_tokens"]
        gap = abs(c["fused_nll_sum"] - c["model_loss_sum"])
        checks.append(Check("SFT fused NLL = the model's cross-entropy", gap <= tolerance,
                            f"{c['fused_nll_sum']:.4f} vs {c['model_loss_sum']:.4f} ({c['response_tokens']} tokens)"))
        checks.append(Check("SFT losses finite", finite(sft["losses"]), _losses(sft["losses"])))
    dpo = results.get("dpo", {})
    if dpo.get("status") == "ok":
        checks.extend(dpo_checks(dpo["checks"], bf16))
        checks.append(Check("DPO losses finite", finite(dpo["losses"]), _losses(dpo["losses"])))
    trl = results.get("trl", {})
    if trl.get("status") == "ok":
        checks.append(Check("TRL losses finite", bool(trl["losses"]) and finite(trl["losses"]), _losses(trl["losses"])))
    sampling = results.get("sampling", {})
    if sampling.get("status") == "ok":
        checks.append(Check("sampling generated tokens", sampling["generated_tokens"] > 0,
                            f"{sampling['generated_tokens']} tokens in {sampling['sequences']} sequences"))
    return checks


def _losses(losses: List[float]) -> str:
    return f"{len(losses)} steps: {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no losses"


def logprob_checks(rows: List[dict]) -> List[Check]:
    """Per shape, every measured cell finite; the per-token methods' value equals naive's, ours_dpo's
    equals Liger's DPO loss (both: sigmoid DPO, summed log-probs, no reference, beta 0.1)."""
    checks, by_shape = [], {}
    for row in rows:
        by_shape.setdefault((row["mode"], row["dtype"], row["hidden"], row["tokens"], row["vocab"]), {})[row["method"]] = row
    measured = [r for r in rows if "skipped" not in r]
    checks.append(Check("log-prob cells finite", bool(measured) and finite(
        [v for r in measured for v in (r["fwd_s"], r["fwdbwd_s"], r["extra_peak_bytes"], r["value"])]),
        f"{len(measured)} of {len(rows)} cells measured"))
    worst_token, worst_dpo, compared_dpo = 0.0, 0.0, 0
    failures = []
    for (mode, dtype, hidden, tokens, vocab), cells in by_shape.items():
        per_token_tol = 2e-2 if dtype == "bfloat16" else 1e-4  # mean over tokens of |value difference|
        naive = cells.get("naive", {})
        for method in ("ours", "ours_nll", "trl_selective", "trl_chunked"):
            cell = cells.get(method, {})
            if "value" in cell and "value" in naive:
                gap = abs(cell["value"] - naive["value"]) / tokens
                worst_token = max(worst_token, gap)
                if not gap <= per_token_tol:
                    failures.append(f"{method} {dtype} H={hidden} T={tokens} V={vocab}: {gap:.2e}/token")
        liger, ours_dpo = cells.get("liger_dpo", {}), cells.get("ours_dpo", {})
        if "value" in liger and "value" in ours_dpo:
            compared_dpo += 1
            gap = abs(liger["value"] - ours_dpo["value"])
            worst_dpo = max(worst_dpo, gap)
            if not gap <= (5e-2 if dtype == "bfloat16" else 5e-3):
                failures.append(f"ours_dpo vs liger {dtype} H={hidden} T={tokens} V={vocab}: {gap:.2e}")
    checks.append(Check("log-prob values agree across methods", not failures,
                        "; ".join(failures) or f"largest per-token gap to naive {worst_token:.1e}; "
                        f"ours_dpo vs Liger: {compared_dpo} shapes, largest gap {worst_dpo:.1e}"))
    return checks


def dpo_checks(c: dict, bf16: bool) -> List[Check]:
    """Tolerances: bf16 sums of a few hundred log-probs computed along different kernel paths
    (another attention mask for the packed rows) differ by a few hundredths of a nat."""
    names = ("fused_packed", "unfused_packed", "unfused_unpacked")
    loss_tolerance = 2e-3 if bf16 else 1e-5  # |loss - log 2|: 0.05 x the policy-reference gap in nats
    logp_tolerance = 2e-3 if bf16 else 1e-5  # relative, on the mean summed log-probs
    norm_tolerance = 5e-2 if bf16 else 1e-4  # relative

    def relative(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    losses = [c[f"{n}_loss"] for n in names]
    logps = [(c[f"{n}_chosen_logps"], c[f"{n}_rejected_logps"]) for n in names]
    norms = [c[f"{n}_grad_norm"] for n in names]
    return [
        Check("DPO layouts ran as asked", [c[f"{n}_packed"] for n in names] == [True, True, False],
              "packed rows: " + ", ".join(f"{n} {c[f'{n}_packed']}" for n in names)),
        Check("DPO loss = log 2 at the reference (fused, unfused, two-sequence)",
              all(abs(x - c["expected_loss"]) <= loss_tolerance for x in losses),
              ", ".join(f"{x:.6f}" for x in losses) + f" (log 2 = {c['expected_loss']:.6f})"),
        Check("DPO policy log-probs agree across layouts",
              all(relative(a, b) <= logp_tolerance for pair in logps[1:] for a, b in zip(logps[0], pair)),
              "; ".join(f"{n}: chosen {lc:.3f}, rejected {lr:.3f}" for n, (lc, lr) in zip(names, logps))),
        Check("DPO gradient norms agree across layouts",
              finite(norms) and norms[0] > 0 and all(relative(x, norms[0]) <= norm_tolerance for x in norms[1:]),
              ", ".join(f"{n} {x:.4e}" for n, x in zip(names, norms))),
        Check("DPO per-token log-probs: packed = two sequences",
              c["token_count"] == c["unpacked_token_count"] and c["token_logp_mean_abs_diff"] <= (5e-2 if bf16 else 1e-4),
              f"mean |difference| {c['token_logp_mean_abs_diff']:.2e} over {c['token_count']} tokens"),
    ]


def device_description(profile: Profile) -> str:
    import platform

    import torch

    if profile.device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    from selfrefine_dist.benchmarks.logprobs import _device_description

    return _device_description("cpu") + f", {platform.machine()}"


def markdown(summary: dict) -> str:
    results, peak = summary["sections"], summary["peak_tflops"]
    lines = [f"# GPU check: {'PASS' if summary['ok'] else 'FAIL'}", "",
             f"{summary['device']}; {summary['mode']} profile; {summary['wall_s']:.0f} s in all; MFU against "
             f"{peak:.3g} TFLOP/s ({summary['peak_source']}).", "",
             "| section | status | seconds | budget s |", "|---|---|---:|---:|"]
    for name, r in results.items():
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(f"| {name} | {status} | {r['seconds']:.0f} | {r['budget_s']:.0f} |")
    lines += ["", "## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in summary["checks"]]
    lines += ["", "## Training and sampling", "",
              "| run | dtype | tokens/step | tokens/s | model TFLOP/s | MFU | peak memory GiB | vs TRL |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    trl = results.get("trl", {})
    for name, label in (("sft", "SFT, ZeRO-3, fused NLL"), ("dpo", "DPO, ZeRO-3, fused loss, packed pairs"),
                        ("trl", "DPO, TRL DPOTrainer")):
        r = results.get(name, {})
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r.get('status', 'not run')}{': ' + r['reason'] if r.get('reason') else ''} "
                         "| | | | | | |")
            continue
        tflops = r.get("model_tflops_per_s")
        ratio = (f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}" if name == "dpo" and trl.get("status") == "ok"
                 else "")
        lines.append(f"| {label} | {r['dtype']} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{'%.3g' % tflops if tflops is not None else ''} | "
                     f"{'%.3g%%' % (100 * tflops / peak) if tflops is not None else ''} | {r['peak_memory_gib']:.2f} | "
                     f"{ratio} |")
    sampling = results.get("sampling", {})
    if sampling.get("status") == "ok":
        lines.append(f"| sampling, HF generate ({sampling['sequences']} sequences, up to "
                     f"{summary['profile']['sample_new_tokens']} new tokens) | {sampling['dtype']} | | "
                     f"{sampling['tokens_per_s']:.0f} | | | {sampling['peak_memory_gib']:.2f} | |")
    lines += ["", "Tokens count prompt + chosen and prompt + rejected per pair (the prompt twice, as TRL runs it); "
              "tokens/s and TFLOP/s are medians over the steps after the first. Model FLOPs: 6 per weight and "
              "token, the lm_head on response tokens, causal attention (a packed row's rejected tokens see the "
              "prompt and themselves)."]
    logprobs = results.get("logprobs", {})
    if logprobs.get("markdown"):
        lines += ["", "## Log-prob benchmark", "", f"{logprobs['device']}; `{logprobs['command']}`",
                  logprobs["markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run at toy sizes on CPU (gloo, Triton interpreted)")
    parser.add_argument("--out", help="output folder (default: $OUT, else gpu_check_out/)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: 989 on CUDA, the H200's dense bf16; CPU: measured matmul)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every section's time budget (a slow or shared machine)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these (the model section is added when a later one needs it)")
    parser.add_argument("--_section", help=argparse.SUPPRESS)
    parser.add_argument("--_profile", help=argparse.SUPPRESS)
    parser.add_argument("--_work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._section:  # inside a section's own process
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the budget ran out
        profile = Profile(**json.loads(args._profile))
        result = SECTION_FUNCTIONS[args._section](profile, Path(args._work))
        (Path(args._work) / f"{args._section}.json").write_text(json.dumps(result))
        return 0

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; `--cpu` runs the dry run at toy sizes", file=sys.stderr)
        return 2
    profile = CPU_PROFILE if args.cpu else CUDA_PROFILE
    profile = replace(profile, budgets={k: v * args.budget_scale for k, v in profile.budgets.items()})
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    sections = [s for s in SECTIONS if s in args.sections or (s == "model" and set(args.sections) & set(NEEDS_MODEL))]
    started = time.perf_counter()
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work, open(out / "sections.log", "w") as log:
        for name in sections:
            if name in NEEDS_MODEL and results.get("model", {}).get("status") != "ok":
                results[name] = dict(status="skipped", reason="no model (the model section failed)", seconds=0.0,
                                     budget_s=profile.budgets[name])
                continue
            results[name] = run_section(name, profile, Path(work), log)
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops, "--peak-tflops"
    elif profile.device == "cuda":
        peak, source = H200_BF16_DENSE_TFLOPS, "H200 dense bf16 peak"
    else:
        peak = results.get("model", {}).get("matmul_tflops") or float("nan")
        source = "this CPU's measured 512x512 matmul rate"
    for name in ("sft", "dpo"):
        if results.get(name, {}).get("status") == "ok":
            results[name]["mfu"] = results[name]["model_tflops_per_s"] / peak
    checks = evaluate(results, profile)
    summary = dict(ok=all(c.ok for c in checks), mode=profile.device, device=device_description(profile),
                   wall_s=time.perf_counter() - started, peak_tflops=peak, peak_source=source,
                   profile=asdict(profile), checks=[asdict(c) for c in checks], sections=results)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    (out / "summary.md").write_text(table)
    print(table)
    for check in checks:
        if not check.ok:
            print(f"FAILED: {check.name}: {check.detail}", file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
