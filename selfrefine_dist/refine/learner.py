"""A DPO learner rank: one DeepSpeed ZeRO-3 process, run as a Ray actor by ``LearnerGroup``.

Per round (the driver calls these in order, on every rank at once):
    train_round(shard)       a fresh optimizer state, reference log-probs of the whole shard once,
                             then DPO steps
    publish_weights(...)     gather the ZeRO-3 weights on rank 0: export a Hugging Face folder
                             and put them into the object store in buckets for the samplers

The step loss is the mean per-pair DPO loss over the global batch: every micro-batch has the
same number of pairs (``plan_round``), so DeepSpeed's averaging over accumulation steps and
ranks gives exactly that mean.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner rank needs, as plain values (no Config object crosses to actors)."""

    policy_path: str  # Hugging Face folder the policy starts from (the SFT model)
    reference_path: Optional[str]  # frozen reference model; None: the policy at the start of each round
    dtype: str  # "fp32", "bf16" or "fp16" (already resolved from "auto")
    trust_remote_code: bool
    backend: str  # "auto", "gloo" or "nccl"
    zero_stage: int
    offload_optimizer: bool
    micro_batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    adam_betas: Tuple[float, float]
    warmup_steps: int
    lr_schedule: str
    max_grad_norm: float
    gradient_checkpointing: bool
    beta: float
    loss_type: str
    label_smoothing: float
    rpo_alpha: Optional[float]
    average_log_prob: Optional[bool]
    fused_loss: bool  # gradients of the DPO loss in the forward, from hidden states (where exact)
    shared_prompt: bool  # one packed row per pair: prompt + chosen + rejected (where the model allows)
    seed: int
    threads: int  # torch threads on CPU


class DPOLearner:
    """One rank. Created by ``LearnerGroup`` inside a placement group bundle."""

    def __init__(self, rank: int, world_size: int, local_rank: int = 0):
        # Ray gives each GPU learner its own device (CUDA_VISIBLE_DEVICES), so its local rank is 0;
        # under the deepspeed launcher (``selfrefine dpo``) the launcher's LOCAL_RANK is passed in.
        self.rank, self.world_size = rank, world_size
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        self.engine = None
        self.reference = None
        self.received_digest = ""

    # ---- set-up -------------------------------------------------------------------------
    def address(self) -> Tuple[str, int]:
        """This node's address and a free port, for the process group's rendezvous (rank 0)."""
        import ray

        from selfrefine_dist.train.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, spec: LearnerSpec, master_addr: str, master_port: int) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(spec.threads)
        from selfrefine_dist.models.loading import load_tokenizer
        from selfrefine_dist.train import distributed as dist

        dist.init_distributed(spec.backend)
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.policy_path, spec.trust_remote_code)
        self.engine = self._engine(spec.policy_path, with_optimizer=True)
        if spec.reference_path is not None:
            self.reference = self._engine(spec.reference_path, with_optimizer=False)

    def _engine(self, path: str, with_optimizer: bool):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from selfrefine_dist.models.loading import load_causal_lm
        from selfrefine_dist.train.ds_config import deepspeed_config

        s = self.spec
        ds_cfg = deepspeed_config(s.micro_batch_size, s.grad_accum, self.world_size, s.zero_stage, s.dtype,
                                  s.max_grad_norm, s.offload_optimizer and with_optimizer)
        hf_ds_config = HfDeepSpeedConfig(ds_cfg) if s.zero_stage == 3 else None  # load ZeRO-3 partitions directly
        model = load_causal_lm(path, "fp32", s.trust_remote_code)
        del hf_ds_config
        if not with_optimizer:
            model.requires_grad_(False)
            engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
            engine.eval()
            return engine
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr,
                                      betas=tuple(s.adam_betas), weight_decay=s.weight_decay)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        return engine

    def restore(self, ckpt_root: str, round_idx: int) -> None:  # ``selfrefine dpo`` checkpoints
        """Continue from the end of round ``round_idx`` (model, optimizer, RNG)."""
        from selfrefine_dist.train.checkpoint import load_checkpoint

        load_checkpoint(self.engine, Path(ckpt_root), round_idx)

    # ---- one round ----------------------------------------------------------------------
    def train_round(self, shard: List[List[list]], round_idx: int) -> List[Dict[str, float]]:
        """DPO on this rank's share of the round: [step][accumulation] -> PreferenceExamples.

        Returns one metrics dict per optimizer step (averaged over ranks; every rank returns them).
        """
        from selfrefine_dist.models.logprobs import accepts_4d_masks
        from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_pairs
        from selfrefine_dist.refine.records import examples_digest

        self.received_digest = examples_digest([ex for step in shard for micro in step for ex in micro])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # Packed rows (prompt once per pair) need the fused head and an attention that takes a 4D mask.
        packed = self.spec.shared_prompt and accepts_4d_masks(self.engine) and (
            self.reference is None or accepts_4d_masks(self.reference))
        collate = collate_packed_pairs if packed else collate_pairs
        batches = [[collate(micro, pad) for micro in step] for step in shard]

        reset_optimizer_state(self.engine)  # each round is a fresh DPO run from the weights the learners hold
        t0 = time.perf_counter()
        ref_logps = self._reference_logps(batches)  # once per round, never per step
        reference_s = time.perf_counter() - t0

        from selfrefine_dist.train.schedule import WarmupThenDecay

        schedule = WarmupThenDecay(self.spec.warmup_steps, len(batches), self.spec.lr_schedule)
        self.engine.train()
        history = []
        for step, (micro_batches, micro_refs) in enumerate(zip(batches, ref_logps)):
            lr = self.spec.lr * schedule(step)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            t_step = time.perf_counter()
            sums: Dict[str, float] = {}
            tokens = 0
            for batch, (ref_chosen, ref_rejected) in zip(micro_batches, micro_refs):
                loss, out = self._dpo_forward(batch, ref_chosen, ref_rejected)
                self.engine.backward(loss)
                self.engine.step()
                for k, v in out.metrics().items():
                    sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
                sums["loss"] = sums.get("loss", 0.0) + loss.item() / len(micro_batches)
                tokens += batch.num_tokens
            metrics = self._mean_over_ranks(sums)
            step_s = time.perf_counter() - t_step
            all_tokens = self._sum_over_ranks(tokens)
            metrics.update(round=round_idx, lr=lr, grad_norm=_grad_norm(self.engine), step_s=step_s,
                           tokens_per_s=all_tokens / step_s, reference_s=reference_s, shared_prompt=float(packed))
            history.append(metrics)
            if self.rank == 0:  # progress, forwarded to the driver's console by Ray
                print(f"dpo round {round_idx} step {step + 1}/{len(batches)}: loss {metrics['loss']:.4f} "
                      f"margin {metrics['rewards/margins']:.3f} acc {metrics['rewards/accuracies']:.2f} "
                      f"{metrics['tokens_per_s']:.0f} tok/s", flush=True)
        return history

    def _dpo_forward(self, batch, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
        """(loss with gradient, DPOLossOutput for the metrics) of one micro-batch.

        Fused (``dpo.fused_loss``, for heads where it is exact): the loss and its gradients come
        from the hidden states in one pass over the vocabulary (three head matmuls per token,
        not four; ``kernels/fused_linear_preference.py``). Otherwise: per-token log-probs, then
        ``dpo_loss`` under autograd. Both use the same ``dpo_loss``.
        """
        from selfrefine_dist.kernels import fused_linear_preference_loss
        from selfrefine_dist.losses import dpo_loss

        s, b = self.spec, batch.num_pairs
        head = head_inputs(self.engine, batch, self._device()) if s.fused_loss else None
        if head is None:
            policy_logps, lengths = self._sequence_logps(self.engine, batch)
        else:
            lengths = (head[2] != -100).sum(-1)

        def loss_of(chosen, rejected):
            return dpo_loss(chosen, rejected, ref_chosen.to(chosen), ref_rejected.to(chosen), s.beta, s.loss_type,
                            s.label_smoothing, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                            average_log_prob=s.average_log_prob, rpo_alpha=s.rpo_alpha)

        if head is None:
            out = loss_of(policy_logps[:b], policy_logps[b:])
            return out.loss, out
        loss, policy_logps = fused_linear_preference_loss(*head, lambda c, r: loss_of(c, r).loss)
        return loss, loss_of(policy_logps[:b], policy_logps[b:])

    @torch.no_grad()
    def _reference_logps(self, batches) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """[step][micro] -> (chosen, rejected) summed log-probs [B] under the reference."""
        model = self.reference if self.reference is not None else self.engine
        was_training = model.training
        model.eval()
        out = []
        for micro_batches in batches:
            row = []
            for batch in micro_batches:
                logps, _ = self._sequence_logps(model, batch)
                row.append((logps[: batch.num_pairs].clone(), logps[batch.num_pairs:].clone()))
            out.append(row)
        model.train(was_training)
        return out

    def _sequence_logps(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """[2B] summed response log-probs and [2B] response lengths."""
        from selfrefine_dist.kernels import fused_linear_token_logprobs
        from selfrefine_dist.models.logprobs import causal_token_logprobs

        head = head_inputs(model, batch, self._device())
        if head is not None:
            hidden, weight, targets = head
            token_logps = fused_linear_token_logprobs(hidden, weight, targets)
            return token_logps.sum(-1), (targets != -100).sum(-1)
        device = self._device()  # logits path: no fused head, never packed
        token_logps = causal_token_logprobs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                            batch.labels.to(device))
        return token_logps.sum(-1), (batch.labels[:, 1:].to(device) != -100).sum(-1)

    def _mean_over_ranks(self, values: Dict[str, float]) -> Dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def _sum_over_ranks(self, value: float) -> float:
        from selfrefine_dist.train import distributed as dist

        return dist.all_reduce_sum(value, self._device())

    def _device(self) -> torch.device:
        from selfrefine_dist.train import distributed as dist

        return dist.device()

    # ---- after a round ------------------------------------------------------------------
    def save(self, ckpt_root: str, round_idx: int) -> None:
        from selfrefine_dist.train.checkpoint import save_checkpoint

        save_checkpoint(self.engine, Path(ckpt_root), round_idx, {"round": round_idx}, keep=1)

    def publish_weights(self, export_dir: Optional[str], bucket_bytes: int) -> List:
        """Gather the full weights on rank 0 (one parameter at a time), export them to
        ``export_dir`` (a Hugging Face folder) and put them in the object store in buckets.

        Returns the bucket references on rank 0, [] elsewhere (and with ``bucket_bytes`` 0, outside
        Ray). Every rank must call it.
        """
        from selfrefine_dist.sampling.weights import named_tensor_buckets
        from selfrefine_dist.train.export import export_state, gather_state_dict

        state = gather_state_dict(self.engine.module)
        if export_dir is not None:
            export_state(self.engine.module, state, self.tokenizer, Path(export_dir))
        if self.rank != 0 or bucket_bytes <= 0:
            return []
        import ray

        return [ray.put(bucket) for bucket in named_tensor_buckets(state.items(), bucket_bytes)]

    # ---- GPU weight sync: NCCL broadcast from rank 0 to the vLLM workers (sampling/nccl_sync.py)
    def join_weight_broadcast(self, master_address: str, master_port: int, world_size: int) -> None:
        if self.rank == 0:
            from selfrefine_dist.sampling.nccl_sync import NcclWeightSender

            self.weight_sender = NcclWeightSender(master_address, master_port, world_size)

    def gather_for_broadcast(self, export_dir: Optional[str], bucket_bytes: int) -> List[list]:
        """Gather (and export) like ``publish_weights``, but keep the buckets here for ``send_bucket``.

        Returns, on rank 0, each bucket's tensor metadata (what the receivers allocate); [] elsewhere.
        """
        from selfrefine_dist.sampling.weights import bucket_metas, named_tensor_buckets
        from selfrefine_dist.train.export import export_state, gather_state_dict

        state = gather_state_dict(self.engine.module)
        if export_dir is not None:
            export_state(self.engine.module, state, self.tokenizer, Path(export_dir))
        self.broadcast_buckets = list(named_tensor_buckets(state.items(), bucket_bytes)) if self.rank == 0 else []
        return [bucket_metas(bucket) for bucket in self.broadcast_buckets]

    def send_bucket(self, index: int) -> None:
        self.weight_sender.send(self.broadcast_buckets[index])
        if index == len(self.broadcast_buckets) - 1:
            self.broadcast_buckets = []

    def digest(self) -> str:
        """sha256 of the preference examples this rank received last round."""
        return self.received_digest


def head_inputs(model, batch, device: torch.device):
    """(hidden [2B, T, H], lm_head weight [V, H], targets [2B, T]) of a preference batch, or None
    without a fused head. Row s of ``hidden`` holds the states that predict sequence s's response
    tokens: from a packed batch (one row per pair) they are gathered by ``batch.positions``."""
    from selfrefine_dist.models.logprobs import causal_hidden_states, decoder_hidden_states
    from selfrefine_dist.refine.records import PackedPreferenceBatch

    if isinstance(batch, PackedPreferenceBatch):
        hidden, weight = decoder_hidden_states(model, input_ids=batch.input_ids.to(device),
                                               attention_mask=batch.attention_mask.to(device),
                                               position_ids=batch.position_ids.to(device))
        rows = torch.arange(2 * batch.num_pairs, device=device) % batch.num_pairs
        return hidden[rows.unsqueeze(1), batch.positions.to(device)], weight, batch.targets.to(device)
    out = causal_hidden_states(model, batch.input_ids.to(device), batch.attention_mask.to(device))
    if out is None:
        return None
    return out[0], out[1], batch.labels[:, 1:].to(device)


def reset_optimizer_state(engine) -> None:
    """Forget Adam's moments and step counts: the next step starts as a new optimizer would.

    DeepSpeed wraps the torch optimizer (ZeRO's partitioned fp32 copies, bf16 wrappers); the torch
    optimizer innermost keeps ``state`` per parameter and re-creates it lazily when it is empty.
    """
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(engine.optimizer).__name__}")
    optimizer.state.clear()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def learner_threads(world_size: int) -> int:
    """Torch threads per CPU learner: its share of this machine's cores, at least one."""
    return max(1, (os.cpu_count() or 1) // max(world_size, 1))
