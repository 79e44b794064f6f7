"""Supervised fine-tuning on teacher demonstrations, on DeepSpeed (ZeRO-3 by default).

Run it through the CLI, which starts one process per learner:

    selfrefine sft --config configs/sft_smollm2_cpu.yaml distributed.nproc_per_node=2

or under an external launcher (several machines):

    deepspeed --hostfile hostfile --module selfrefine_dist.cli sft --config configs/x.yaml

The loss is the mean negative log-likelihood over all response tokens of an
optimizer step (every micro-batch and rank together), so the gradient does not
depend on how the step is split into micro-batches or accumulation steps.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
import torch

from selfrefine_dist.config import Config
from selfrefine_dist.data.sft_dataset import SFTSlice, build_sft_data, collate
from selfrefine_dist.data.sources import load_slices
from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype, resolve_model_path
from selfrefine_dist.models.logprobs import causal_nll_sum
from selfrefine_dist.tracking import MetricsLogger, config_dict
from selfrefine_dist.train import distributed as dist
from selfrefine_dist.train.checkpoint import latest_step, load_checkpoint, save_checkpoint
from selfrefine_dist.train.ds_config import deepspeed_config, resolve_zero_stage
from selfrefine_dist.train.engine import (AdamWSettings, grad_norm, load_model, optimizer_step, resolve_per_forward,
                                          wrap)
from selfrefine_dist.train.memory import GIB, peak_rss_bytes, reset_peak_rss
from selfrefine_dist.train.export import export_hf
from selfrefine_dist.train.schedule import BatchPlan, WarmupThenDecay


def prepare_sft_data(cfg: Config, tokenizer, out_dir: Path):
    """Every ``data.train`` slice tokenized with its own style (its ``prompt_style``, else
    ``data.prompt_style``): cot slices keep the demonstrations that pass the answer check, direct
    slices train the answer sentence alone. The per-slice report goes to ``out_dir``."""
    teacher_rationales = None
    if cfg.teach.enabled:  # the teacher's checked demonstrations (``selfrefine teach``) replace the data's own
        from selfrefine_dist.data.demonstrations import demonstrations_path, read_demonstrations

        teacher_rationales = {ex.uid: ex.rationale for ex in read_demonstrations(demonstrations_path(out_dir.parent))}
    slices = []
    for i, ds in enumerate(cfg.data.train):
        style = ds.prompt_style or cfg.data.prompt_style
        examples = load_slices([ds])
        if teacher_rationales is not None and style == "cot":
            # a question the teacher got wrong has no demonstration: dropped as "no_rationale"
            examples = [replace(ex, rationale=teacher_rationales.get(ex.uid)) for ex in examples]
        slices.append(SFTSlice(f"data.train[{i}] {ds.task}/{ds.split}", style, tuple(examples)))
    sft_examples, data_report = build_sft_data(slices, tokenizer, cfg.data.max_len)
    report = data_report.as_dict()
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "data_report.json").write_text(json.dumps(report, indent=2))
        for slice_report in data_report.slices:
            dist.print0(slice_report.summary())
        tokenized = data_report.tokenize
        dist.print0(f"sft examples: {tokenized.kept} (dropped: {tokenized.dropped or 'none'}, "
                    f"max_len {cfg.data.max_len})")
    return sft_examples, report


def build_engine(cfg: Config, num_examples: int):
    """Model (+LoRA), AdamW and its warm-up/decay schedule in a DeepSpeed engine (``train/engine.py``).

    DeepSpeed's micro-step is one forward part of a micro-batch (``sft.examples_per_forward`` examples):
    a step is ``grad_accum`` micro-batches of ``micro_batch_size / examples_per_forward`` parts each."""
    per_forward = resolve_per_forward(cfg.sft.examples_per_forward, cfg.sft.micro_batch_size, "sft.examples_per_forward")
    parts = cfg.sft.micro_batch_size // per_forward
    ds_cfg = deepspeed_config(
        per_forward, cfg.sft.grad_accum * parts, dist.world_size(),
        resolve_zero_stage(cfg.distributed.zero_stage, dist.world_size()),
        resolve_dtype(cfg.model.dtype), cfg.sft.max_grad_norm, cfg.distributed.offload_optimizer,
    )
    model = load_model(resolve_model_path(cfg.model.name_or_path), ds_cfg, cfg.model.trust_remote_code,
                       cfg.model.revision)
    if cfg.sft.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lean_activations:
        from selfrefine_dist.models.lean_activations import use_lean_activations

        use_lean_activations(model)
    if cfg.sft.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = cfg.sft.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    plan = BatchPlan(num_examples, cfg.sft.micro_batch_size, cfg.sft.grad_accum, dist.world_size(), cfg.run.seed)
    total_steps = plan.total_steps(cfg.sft.epochs, cfg.sft.max_steps)
    engine = wrap(model, ds_cfg, AdamWSettings(cfg.sft.lr, tuple(cfg.sft.adam_betas), cfg.sft.weight_decay),
                  lr_lambda=WarmupThenDecay(cfg.sft.warmup_steps, total_steps, cfg.sft.lr_schedule))
    return engine, plan, total_steps


def run_sft(cfg: Config, run_dir: Path) -> Path:
    """Train, checkpoint, resume, export. Returns the exported model folder."""
    dist.init_distributed(cfg.distributed.backend, cfg.distributed.cpu_memory)
    torch.manual_seed(cfg.run.seed)
    out_dir = Path(run_dir) / "sft"
    ckpt_dir, model_dir = out_dir / "checkpoints", out_dir / "model"
    logger = MetricsLogger(run_dir, enabled=dist.is_main(), wandb_mode=cfg.logging.wandb_mode,
                           wandb_project=cfg.logging.wandb_project, wandb_run_name=cfg.logging.wandb_run_name,
                           config=config_dict(cfg))

    # ---- data
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code,
                               cfg.model.revision)
    sft_examples, _ = prepare_sft_data(cfg, tokenizer, out_dir)

    # ---- model, optimizer, schedule
    engine, plan, total_steps = build_engine(cfg, len(sft_examples))
    start_step = 0
    resume_from = latest_step(ckpt_dir)
    if resume_from is not None:
        state = load_checkpoint(engine, ckpt_dir, resume_from)
        start_step = state["global_step"]
        dist.print0(f"resumed from {ckpt_dir}/step_{resume_from:08d} (step {start_step} of {total_steps})")
    dist.print0(f"sft: {len(sft_examples)} examples, {plan.steps_per_epoch} steps/epoch, {total_steps} steps, "
                f"global batch {plan.global_batch_size}, world {dist.world_size()}, "
                f"zero stage {resolve_zero_stage(cfg.distributed.zero_stage, dist.world_size())}, "
                f"dtype {resolve_dtype(cfg.model.dtype)}")

    # ---- train
    stop_at = min(total_steps, cfg.sft.stop_at_step or total_steps)
    progress = _progress(range(start_step, stop_at), total_steps, start_step, cfg.logging.progress_bars)
    engine.train()
    for step in progress:
        reset_peak_rss()
        t0 = time.perf_counter()
        per_forward = engine.train_micro_batch_size_per_gpu()  # examples per forward part
        parts = [collate([sft_examples[i] for i in idx[k:k + per_forward]], tokenizer.pad_token_id)
                 for idx in plan.micro_batches(step, dist.rank()) for k in range(0, len(idx), per_forward)]
        step_response_tokens = dist.all_reduce_sum(sum(b.num_response_tokens for b in parts), engine.device)
        # engine.backward divides by its accumulation steps (grad_accum x parts per micro-batch) and gradients
        # are averaged over ranks: undo both so the step's gradient is d(sum of NLL over the whole step) /
        # (response tokens of the whole step), however the step is cut into parts.
        scale = engine.gradient_accumulation_steps() * dist.world_size() / step_response_tokens
        nll_sum, tokens, lr = 0.0, 0, engine.get_lr()[0]
        for batch in parts:
            batch_on = {k: v.to(engine.device) for k, v in
                        dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).items()}
            nll = causal_nll_sum(engine, **batch_on)
            engine.backward(nll * scale)
            optimizer_step(engine)
            nll_sum += nll.item()
            tokens += int(batch.attention_mask.sum())
        elapsed = time.perf_counter() - t0
        all_tokens = dist.all_reduce_sum(tokens, engine.device)
        loss = dist.all_reduce_sum(nll_sum, engine.device) / step_response_tokens
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm(engine),
                   "tokens_per_s": all_tokens / elapsed, "step_s": elapsed, "epoch": step // plan.steps_per_epoch,
                   "peak_rss_gib": dist.all_reduce_max(peak_rss_bytes(), engine.device) / GIB}  # largest rank's
        if (step + 1) % cfg.sft.log_every == 0 or step + 1 == stop_at:
            logger.log(metrics, step=step + 1, stage="sft")
        if hasattr(progress, "set_postfix"):
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if (cfg.sft.save_every and (step + 1) % cfg.sft.save_every == 0) or step + 1 == stop_at:
            save_checkpoint(engine, ckpt_dir, step + 1, {"global_step": step + 1, "total_steps": total_steps},
                            cfg.sft.keep_checkpoints)

    finished = latest_step(ckpt_dir) == total_steps or start_step == total_steps
    if finished:
        export_hf(engine.module, tokenizer, model_dir)
        dist.print0(f"exported {model_dir}")
    logger.finish()
    return model_dir


def _progress(steps, total, start, enabled):
    if not (enabled and dist.is_main()):
        return steps
    from tqdm import tqdm

    return tqdm(steps, total=total, initial=start, desc="sft", dynamic_ncols=True)
