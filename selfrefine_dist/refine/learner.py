"""A learner rank: one DeepSpeed ZeRO-3 process, run as a Ray actor by ``LearnerGroup``; it trains SFT
and then DPO in the same process group.

    connect(addr, port, ...) the process group (gloo on CPU, NCCL on GPU), once
    train_sft(config, run)   SFT (``train/sft.py``'s ``run_sft``, the recipe ``selfrefine sft`` runs under
                             torchrun): train, checkpoint, resume, export ``<run>/sft/model``
    setup(spec, ...)         a DPO policy engine from an exported folder (the SFT model, a round's model)

Per round (the driver calls these in order, on every rank at once):
    train_round(shard)       a fresh optimizer state, reference log-probs of the whole shard once
                             (a frozen reference is loaded for that pass and freed after it, so it
                             holds no memory while the policy trains), then DPO steps
    put_weights(...)         gather the ZeRO-3 weights on rank 0 and put them into the object store
                             in buckets for the samplers
    export_put_weights(dir)  write them as a Hugging Face folder (while the samplers load the buckets);
                             ``publish_weights`` does both in one call

The step loss is the mean per-pair DPO loss over the global batch: every micro-batch has the
same number of pairs (``plan_round``), so averaging over accumulation steps and ranks gives
exactly that mean.

A micro-batch runs through the model ``pairs_per_forward`` pairs at a time (one pair on CPU by
default), each part a DeepSpeed micro-step of its own: no padding to the micro-batch's longest
pair and the activations of one part at a time, with the micro-batch's loss and gradient
unchanged (``_train_micro_batch``).
"""
from __future__ import annotations

import gc
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch

from selfrefine_dist.refine.records import DPOStepMetrics, HeadInputs, ReferencedMicroBatch
from selfrefine_dist.train.engine import (AdamWSettings, grad_norm, load_model, optimizer_step, resolve_per_forward,
                                          set_lr, wrap)
from selfrefine_dist.train.memory import GIB, peak_rss_bytes, reset_peak_rss, trim_heap

if TYPE_CHECKING:
    from selfrefine_dist.config import Config


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner rank needs, as plain values (no Config object crosses to actors)."""

    policy_path: str  # Hugging Face folder the policy starts from (the SFT model)
    reference_path: Optional[str]  # frozen reference model; None: the policy at the start of each round
    dtype: str  # "fp32", "bf16" or "fp16" (already resolved from "auto")
    trust_remote_code: bool
    backend: str  # "auto", "gloo" or "nccl"
    zero_stage: Optional[int]  # None: 0 for one rank, 3 for several (ds_config.resolve_zero_stage)
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
    lean_activations: bool  # model.lean_activations: the policy's RMSNorm and MLP keep fewer activations
    beta: float
    loss_type: str
    label_smoothing: float
    rpo_alpha: Optional[float]
    average_log_prob: Optional[bool]
    fused_loss: bool  # gradients of the DPO loss in the forward, from hidden states (where exact)
    shared_prompt: bool  # one packed row per pair: prompt + chosen + rejected (where the model allows)
    seed: int
    threads: int  # torch threads on CPU
    # Pairs per forward/backward inside a micro-batch (a divisor of micro_batch_size). None: one on
    # CPU (no padding, activations of one pair; several go side by side in one packed row, faster), the
    # whole micro-batch on GPU.
    pairs_per_forward: Optional[int] = None
    cpu_memory: str = "lean"  # distributed.cpu_memory (train/memory.py)


class Learner:
    """One rank. Created by ``LearnerGroup`` inside a placement group bundle."""

    def __init__(self, rank: int, world_size: int, local_rank: int = 0):
        # Ray gives each GPU learner its own device (CUDA_VISIBLE_DEVICES), so its local rank is 0;
        # under the deepspeed launcher (``selfrefine dpo``) the launcher's LOCAL_RANK is passed in.
        self.rank, self.world_size = rank, world_size
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        self.engine = None
        self.untrained_from: Optional[str] = None  # see _load_reference
        self.received_digest = ""
        self.round_idx = 0  # the round trained last
        self.reference_cache, self.reference_cache_of = None, None  # see setup and _reference_logps
        self.reference_sequences = (0, 0)  # (run through the reference, needed) last round, this rank
        self.reference_computed: Dict[str, float] = {}  # the values this rank's last reference pass computed
        self.weights_to_export: Optional[Dict[str, torch.Tensor]] = None  # put_weights -> export_put_weights

    # ---- set-up -------------------------------------------------------------------------
    def address(self) -> Tuple[str, int]:
        """This node's address and a free port, for the process group's rendezvous (rank 0)."""
        import ray

        from selfrefine_dist.train.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def where(self) -> Tuple[str, int]:
        """(Ray node id, process id) of this rank: which node holds it."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def connect(self, master_addr: str, master_port: int, backend: str, threads: int, cpu_memory: str = "lean") -> None:
        """Join the learners' process group (rank 0 listens at ``master_addr:master_port``); once."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(threads)
        from selfrefine_dist.train import distributed as dist

        dist.init_distributed(backend, cpu_memory)

    def train_sft(self, config_file: str, run_dir: str) -> str:
        """SFT as ``selfrefine sft`` runs it under torchrun (the same ``run_sft``: engine, optimizer,
        schedule, checkpoints, export), on this group's ranks; returns the exported model folder."""
        from selfrefine_dist.config import load_config
        from selfrefine_dist.train.sft import run_sft

        model_dir = run_sft(load_config(config_file, []), Path(run_dir))
        gc.collect()  # the SFT engine is gone with run_sft's frame; free it before a DPO engine is built
        return str(model_dir)

    def setup(self, spec: LearnerSpec, master_addr: str, master_port: int) -> None:
        """The DPO policy engine from ``spec.policy_path`` (replacing any engine this rank holds)."""
        from selfrefine_dist.models.loading import load_tokenizer

        self.connect(master_addr, master_port, spec.backend, spec.threads, spec.cpu_memory)
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            gc.collect()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.pairs_per_forward = resolve_per_forward(spec.pairs_per_forward, spec.micro_batch_size, "pairs_per_forward")
        self.tokenizer = load_tokenizer(spec.policy_path, spec.trust_remote_code)
        self.engine = self._engine(spec.policy_path, with_optimizer=True)
        self.untrained_from = spec.policy_path  # the folder the policy's weights still equal (None once trained)
        if (spec.reference_path, spec.dtype) != self.reference_cache_of:  # a frozen reference's values, kept
            from selfrefine_dist.refine.reference_cache import ReferenceCache

            self.reference_cache, self.reference_cache_of = ReferenceCache(), (spec.reference_path, spec.dtype)

    def _engine(self, path: str, with_optimizer: bool):
        from selfrefine_dist.train.ds_config import deepspeed_config, resolve_zero_stage

        s = self.spec
        # DeepSpeed's micro-step is one forward part of a micro-batch (``_train_micro_batch``)
        parts = s.micro_batch_size // self.pairs_per_forward
        # A frozen reference has no optimizer state to partition: stages 1 and 2 shard only that, so it runs
        # unsharded (stage 0); stage 3 shards its weights too.
        stage = resolve_zero_stage(s.zero_stage, self.world_size)
        stage = stage if with_optimizer or stage == 3 else 0
        ds_cfg = deepspeed_config(self.pairs_per_forward, s.grad_accum * parts, self.world_size, stage,
                                  s.dtype, s.max_grad_norm, s.offload_optimizer and with_optimizer)
        model = load_model(path, ds_cfg, s.trust_remote_code)
        if s.shared_prompt:
            from selfrefine_dist.models.segments import enable_segment_attention

            enable_segment_attention(model)  # packed rows of several pairs (``_one_row``); plain SDPA otherwise
        if not with_optimizer:
            return wrap(model, ds_cfg)
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if s.lean_activations:
            from selfrefine_dist.models.lean_activations import use_lean_activations

            use_lean_activations(model)
        return wrap(model, ds_cfg, AdamWSettings(s.lr, tuple(s.adam_betas), s.weight_decay))

    def restore(self, ckpt_root: str, round_idx: int) -> None:  # ``selfrefine dpo`` checkpoints
        """Continue from the end of round ``round_idx`` (model, optimizer, RNG)."""
        from selfrefine_dist.train.checkpoint import load_checkpoint

        load_checkpoint(self.engine, Path(ckpt_root), round_idx)
        self.untrained_from = None

    # ---- one round ----------------------------------------------------------------------
    def train_round(self, shard: List[List[list]], round_idx: int,
                    known_reference_logps: Optional[Dict[str, float]] = None) -> List[DPOStepMetrics]:
        """DPO on this rank's share of the round: [step][accumulation] -> PreferenceExamples.

        ``known_reference_logps`` (hex sequence key -> log-prob): under a frozen reference, the values
        of the rounds before (the loop's saved tables), replacing what this rank kept; None keeps them.
        Returns one ``DPOStepMetrics`` per optimizer step (averaged over ranks; every rank returns them).
        """
        from functools import partial

        from selfrefine_dist.models.logprobs import accepts_4d_masks
        from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_pairs
        from selfrefine_dist.refine.records import examples_digest

        self.received_digest = examples_digest([ex for step in shard for micro in step for ex in micro])
        self.round_idx = round_idx
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        reset_peak_rss()
        t0 = time.perf_counter()
        # Packed rows (prompt once per pair) need the fused head and an attention that takes a 4D mask.
        packed = self.spec.shared_prompt and accepts_4d_masks(self.engine)
        collate = partial(collate_packed_pairs, one_row=_one_row(self.engine)) if packed else collate_pairs
        reset_optimizer_state(self.engine)  # each round is a fresh DPO run from the weights the learners hold
        if known_reference_logps is not None and self.spec.reference_path is not None:
            from selfrefine_dist.refine.reference_cache import ReferenceCache

            self.reference_cache = ReferenceCache.from_table(known_reference_logps)
        ref_logps = self._reference_logps(shard, pad)  # [step][micro] (chosen, rejected): once per round
        self.untrained_from = None  # the steps below move the policy away from its folder
        # [step][accumulation][part]: each micro-batch in parts of pairs_per_forward pairs
        steps = [[ReferencedMicroBatch(tuple(collate(micro[i:i + self.pairs_per_forward], pad)
                                             for i in range(0, len(micro), self.pairs_per_forward)),
                                       ref_chosen, ref_rejected)
                  for micro, (ref_chosen, ref_rejected) in zip(step, step_refs)]
                 for step, step_refs in zip(shard, ref_logps)]
        del ref_logps
        reference_s = time.perf_counter() - t0
        reference_peak_gib = self._max_over_ranks(peak_rss_bytes()) / GIB
        reference_run, reference_needed = (self._sum_over_ranks(n) for n in self.reference_sequences)

        from selfrefine_dist.train.schedule import WarmupThenDecay

        schedule = WarmupThenDecay(self.spec.warmup_steps, len(steps), self.spec.lr_schedule)
        self.engine.train()
        history: List[DPOStepMetrics] = []
        for step, micro_batches in enumerate(steps):
            fault_point(f"kill_learner_at_step:{round_idx}:{step + 1}:{self.rank}")
            lr = self.spec.lr * schedule(step)
            set_lr(self.engine, lr)
            reset_peak_rss()
            t_step, cpu_step = time.perf_counter(), time.process_time()
            sums: Dict[str, float] = {}
            for micro in micro_batches:
                out = self._train_micro_batch(micro)
                for k, v in {**out.metrics(), "loss": out.loss.item()}.items():
                    sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
            means = self._mean_over_ranks(sums)
            step_s, step_cpu_s = time.perf_counter() - t_step, time.process_time() - cpu_step
            all_tokens = self._sum_over_ranks(sum(micro.num_tokens for micro in micro_batches))
            metrics = DPOStepMetrics.from_dict(dict(
                means, round=round_idx, lr=lr, grad_norm=grad_norm(self.engine), step_s=step_s,
                tokens_per_s=all_tokens / step_s, reference_s=reference_s, shared_prompt=packed,
                step_cpu_s=self._sum_over_ranks(step_cpu_s),  # CPU seconds, all ranks' processes
                reference_sequences_run=reference_run, reference_sequences=reference_needed,
                peak_rss_gib=self._max_over_ranks(peak_rss_bytes()) / GIB, reference_peak_rss_gib=reference_peak_gib))
            history.append(metrics)
            if self.rank == 0:  # progress, forwarded to the driver's console by Ray
                print(f"dpo round {round_idx} step {step + 1}/{len(steps)}: loss {metrics.loss:.4f} "
                      f"margin {metrics.rewards_margins:.3f} acc {metrics.rewards_accuracies:.2f} "
                      f"{metrics.tokens_per_s:.0f} tok/s", flush=True)
        if not torch.cuda.is_available():
            trim_heap()  # the round's freed activations back to the OS while the samplers run (cpu_memory: fast)
        return history

    def _train_micro_batch(self, micro: ReferencedMicroBatch):
        """Forward and backward of one micro-batch, given in parts (batches of ``pairs_per_forward``
        pairs); returns the micro-batch's DPOLossOutput (detached), for the metrics.

        The loss is the micro-batch's ``dpo_loss``. Part k's backward takes its gradient with
        respect to part k's log-probs alone, the other pairs held at their reference log-probs
        (``_loss_of_part``): that is the micro-batch loss's own gradient whenever the loss is a
        sum of per-pair terms plus terms linear in the log-probs (every DPO loss type, RPO's
        NLL), which ``_check_parts_separable`` verifies. So the parts' gradients add up to the
        micro-batch's, while only one part's activations exist at a time.
        """
        from selfrefine_dist.losses import dpo_loss

        s, device, parts = self.spec, self._device(), micro.parts
        sizes = [part.num_pairs for part in parts]
        lengths = [response_lengths(part).to(device) for part in parts]  # [2n] each: chosen, then rejected
        chosen_lengths = torch.cat([n_tokens[:n] for n_tokens, n in zip(lengths, sizes)])
        rejected_lengths = torch.cat([n_tokens[n:] for n_tokens, n in zip(lengths, sizes)])
        ref_chosen, ref_rejected = micro.ref_chosen.to(device), micro.ref_rejected.to(device)

        def micro_loss(chosen, rejected):
            return dpo_loss(chosen, rejected, ref_chosen.to(chosen), ref_rejected.to(chosen), s.beta, s.loss_type,
                            s.label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                            average_log_prob=s.average_log_prob, rpo_alpha=s.rpo_alpha)

        chosen, rejected, start = [], [], 0
        for part, n in zip(parts, sizes):
            part_loss = _loss_of_part(micro_loss, ref_chosen, ref_rejected, start, n)
            loss, policy_logps = self._part_forward(part, part_loss)
            # every part is a DeepSpeed micro-step; the step's gradient is the mean over its micro-batches
            self.engine.backward(loss / s.grad_accum, scale_wrt_gas=False)
            optimizer_step(self.engine)
            chosen.append(policy_logps[:n])
            rejected.append(policy_logps[n:])
            start += n
        if len(parts) > 1:
            _check_parts_separable(micro_loss, ref_chosen, ref_rejected, chosen, rejected)
        return micro_loss(torch.cat(chosen), torch.cat(rejected))

    def _part_forward(self, batch, part_loss):
        """(loss with gradient, policy log-probs [2B] detached) of one part of a micro-batch.

        Fused (``dpo.fused_loss``, for heads where it is exact): the loss and its gradients come
        from the hidden states in one pass over the vocabulary (three head matmuls per token,
        not four; ``kernels/fused_linear_preference.py``). Otherwise: per-token log-probs, then
        the loss under autograd. Both use the same ``part_loss``.
        """
        from selfrefine_dist.kernels import fused_linear_preference_loss

        b = batch.num_pairs
        head = head_inputs(self.engine, batch, self._device()) if self.spec.fused_loss else None
        if head is None:
            policy_logps, _ = self._sequence_logps(self.engine, batch)
            return part_loss(policy_logps[:b], policy_logps[b:]), policy_logps.detach()
        loss, policy_logps = fused_linear_preference_loss(*head, part_loss)
        return loss, policy_logps.detach()

    def _load_reference(self):
        """The model the round's reference log-probs come from: the frozen reference (``reference_path``),
        loaded for this pass only; or the policy itself (the policy at the start of the round).

        A policy not trained since it was loaded from the reference's own folder (round 1 with
        ``dpo.reference: sft``) is that reference, weight for weight: it serves, in eval mode and
        without gradients, and no second copy is loaded (the log-probs are equal, bit for bit).
        """
        if self.spec.reference_path is None or same_folder(self.untrained_from, self.spec.reference_path):
            return self.engine
        return self._engine(self.spec.reference_path, with_optimizer=False)

    def _reference_logps(self, shard: List[List[list]], pad: int) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """[step][micro] -> (chosen [B], rejected [B]) summed reference log-probs of the shard's pairs.

        Each distinct sequence runs through the reference once (``refine/reference_cache.py``); under a
        frozen reference the values are kept across rounds, and a round whose sequences are all known
        loads no reference. Ranks run the same number of forwards (ZeRO-3 gathers weights in each).
        """
        from selfrefine_dist.models.logprobs import accepts_4d_masks
        from selfrefine_dist.refine.preference_data import collate_sequences
        from selfrefine_dist.refine.reference_cache import ReferenceCache, reference_batches

        # the policy-as-reference moves every round: its values serve this round only
        cache = self.reference_cache if self.spec.reference_path is not None else ReferenceCache()
        groups = cache.missing([ex for step in shard for micro in step for ex in micro])
        self.reference_computed = {}
        self.reference_sequences = (sum(len(g.responses) for g in groups),
                                    2 * sum(len(micro) for step in shard for micro in step))
        if self._max_over_ranks(self.reference_sequences[0]) > 0:
            reference = self._load_reference()
            was_training = reference.training
            reference.eval()
            packed = self.spec.shared_prompt and accepts_4d_masks(reference)
            # Rows of many segments hold larger activations: under cpu_memory lean each one is a fresh mapping
            # the pass faults in (2-core EPYC, round-1 twins: 18-20 s in rows of 1024 tokens against 16.4 s one
            # pair a row; fast: 12.1 s against 15-16 s), so one-row reference batches go with fast.
            one_row = _one_row(reference) and self.spec.cpu_memory == "fast"
            batches = list(reference_batches(groups, packed, pad, self.pairs_per_forward, one_row))
            # A rank with fewer new sequences joins the others' forwards with a filler row: under ZeRO-3
            # every forward gathers weights from all ranks. The count is agreed before any forward.
            forwards = int(self._max_over_ranks(len(batches)))
            filler = (collate_sequences([((pad,), (pad,))], pad), [])
            with torch.no_grad():
                for batch, keys in batches + [filler] * (forwards - len(batches)):
                    logps = self._sequence_logps(reference, batch)[0]
                    if keys:
                        cache.store(keys, logps)
            reference.train(was_training)
            self.reference_computed = cache.table(key for _, keys in batches for key in keys)
            # A loaded reference would only hold memory while the policy trains: free it (gc: the engine
            # and its module hold reference cycles).
            if reference is not self.engine:
                reference.destroy()
            del reference
            gc.collect()
            if not torch.cuda.is_available():
                trim_heap()  # the reference's weights and the pass's activations (kept in the heap when fast)
        return [[cache.pair_logps(micro) for micro in step] for step in shard]

    def computed_reference_logps(self) -> Dict[str, float]:
        """The values this rank's last reference pass computed (hex sequence key -> log-prob)."""
        return self.reference_computed

    @torch.no_grad()
    def _forward_logps(self, model, batches) -> List[torch.Tensor]:
        """Summed response log-probs of each batch's rows under ``model`` in eval mode ([2B] per preference
        batch: chosen rows, then rejected), the way the reference pass runs them."""
        was_training = model.training
        model.eval()
        out = [self._sequence_logps(model, batch)[0] for batch in batches]
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

    def _max_over_ranks(self, value: float) -> float:
        from selfrefine_dist.train import distributed as dist

        return dist.all_reduce_max(value, self._device())

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
        refs = self.put_weights(bucket_bytes)
        self.export_put_weights(export_dir)
        return refs

    def put_weights(self, bucket_bytes: int) -> List:
        """The first half of ``publish_weights``: gather, put the buckets, keep the weights for
        ``export_put_weights`` (which the sync runs while the samplers load the buckets)."""
        from selfrefine_dist.sampling.weights import named_tensor_buckets
        from selfrefine_dist.train.export import gather_state_dict

        self.weights_to_export = gather_state_dict(self.engine.module)
        if self.rank != 0 or bucket_bytes <= 0:
            return []
        import ray

        return [ray.put(bucket) for bucket in named_tensor_buckets(self.weights_to_export.items(), bucket_bytes)]

    def export_put_weights(self, export_dir: Optional[str]) -> None:
        """The second half: the weights ``put_weights`` gathered, as a Hugging Face folder (if ``export_dir``)."""
        from selfrefine_dist.train.export import export_state

        state, self.weights_to_export = self.weights_to_export, None
        if state is None:
            raise RuntimeError("export_put_weights: no weights kept; put_weights gathers them first")
        fault_point(f"kill_learner_in_export:{self.round_idx}:{self.rank}")
        if export_dir is not None:
            export_state(self.engine.module, state, self.tokenizer, Path(export_dir))

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


def fault_point(point: str) -> None:
    """Test-only fault injection (tests/refine/test_loop.py): when ``SELFREFINE_FAULT`` equals
    ``point`` (``kill_learner_at_step:ROUND:STEP:RANK``, ``kill_learner_in_export:ROUND:RANK``) this process
    SIGKILLs itself there. Unset, as it is everywhere but in those tests, it does nothing."""
    if os.environ.get("SELFREFINE_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def head_inputs(model, batch, device: torch.device) -> Optional[HeadInputs]:
    """``HeadInputs`` (hidden [S, T, H], lm_head weight [V, H], targets [S, T]) of a batch's S response
    sequences (a preference batch: 2B, chosen first), or None without a fused head. Row s of ``hidden``
    holds the states that predict sequence s's response tokens: from packed rows (``PackedRows``) they
    are gathered by ``batch.positions`` (flat indices into the rows' states)."""
    from selfrefine_dist.models.logprobs import causal_hidden_states, decoder_hidden_states
    from selfrefine_dist.refine.records import PackedRows

    if isinstance(batch, PackedRows):
        segments = {"segments": batch.segments} if batch.segments else {}
        hidden, weight = decoder_hidden_states(model, input_ids=batch.input_ids.to(device),
                                               attention_mask=batch.attention_mask.to(device),
                                               position_ids=batch.position_ids.to(device), **segments)
        return HeadInputs(hidden.flatten(0, 1)[batch.positions.to(device)], weight, batch.targets.to(device))
    out = causal_hidden_states(model, batch.input_ids.to(device), batch.attention_mask.to(device))
    if out is None:
        return None
    return HeadInputs(out[0], out[1], batch.labels[:, 1:].to(device))


def _one_row(model) -> bool:
    """Whether packed pairs (sequences) go side by side in one row per forward: where the model runs
    ``models/segments.py``'s per-segment attention, on CPU. There a forward's matmuls run over all of a
    part's tokens at once (one [tokens x hidden] product, not one per pair), at a higher rate (a 640-row
    matmul ~1.25x a 160-row one on 2 cores) with no padding. On GPU the rows stay one per pair, padded:
    the batch dimension fills the device already, and a one-row mask would grow as the row's square."""
    from selfrefine_dist.models.logprobs import runs_segment_attention

    return runs_segment_attention(model) and not torch.cuda.is_available()


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


def response_lengths(batch) -> torch.Tensor:
    """[2B] response token counts of a preference batch (chosen rows first), packed or not."""
    from selfrefine_dist.refine.records import PackedRows

    if isinstance(batch, PackedRows):
        return (batch.targets != -100).sum(-1)
    return (batch.labels[:, 1:] != -100).sum(-1)


def _loss_of_part(micro_loss, fill_chosen: torch.Tensor, fill_rejected: torch.Tensor, start: int, n: int):
    """The micro-batch loss as a function of pairs [start, start + n) alone: the other pairs' log-probs
    are held at ``fill_*`` [B] (constants). Returns (chosen [n], rejected [n]) -> [] loss."""
    def part_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        c = torch.cat([fill_chosen[:start].to(chosen), chosen, fill_chosen[start + n:].to(chosen)])
        r = torch.cat([fill_rejected[:start].to(rejected), rejected, fill_rejected[start + n:].to(rejected)])
        return micro_loss(c, r).loss

    return part_loss


def _check_parts_separable(micro_loss, fill_chosen, fill_rejected, chosen: List[torch.Tensor],
                           rejected: List[torch.Tensor]) -> None:
    """Raise unless each part's gradient (others held at ``fill_*``) equals the micro-batch loss's
    gradient at the log-probs all parts reached: true for losses that do not couple pairs."""
    with torch.enable_grad():
        c_all = torch.cat(chosen).requires_grad_(True)
        r_all = torch.cat(rejected).requires_grad_(True)
        want_c, want_r = torch.autograd.grad(micro_loss(c_all, r_all).loss, (c_all, r_all))
        start = 0
        for c, r in zip(chosen, rejected):
            n = c.shape[0]
            c, r = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
            got_c, got_r = torch.autograd.grad(_loss_of_part(micro_loss, fill_chosen, fill_rejected, start, n)(c, r),
                                               (c, r))
            if not (torch.allclose(got_c, want_c[start:start + n], rtol=1e-4, atol=1e-7)
                    and torch.allclose(got_r, want_r[start:start + n], rtol=1e-4, atol=1e-7)):
                raise ValueError("the DPO loss couples pairs of a micro-batch: its gradient cannot be taken part by "
                                 "part; set pairs_per_forward to the micro-batch size")
            start += n




def same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def learner_threads(world_size: int) -> int:
    """Torch threads per CPU learner: its share of this machine's cores, at least one."""
    return max(1, (os.cpu_count() or 1) // max(world_size, 1))


def learner_spec(cfg: Config, sft_model: str, world_size: int, policy_path: Optional[str] = None) -> LearnerSpec:
    """The learners' settings from the config: the policy starts from ``policy_path`` (default: the SFT model).
    Used by the loop's driver and by ``selfrefine dpo`` (which imports no Ray)."""
    from selfrefine_dist.models.loading import resolve_dtype

    d = cfg.dpo
    return LearnerSpec(
        policy_path=policy_path or sft_model, reference_path=sft_model if d.reference == "sft" else None,
        dtype=resolve_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code,
        lean_activations=cfg.model.lean_activations,
        backend=cfg.distributed.backend, zero_stage=cfg.distributed.zero_stage,
        offload_optimizer=cfg.distributed.offload_optimizer, micro_batch_size=d.micro_batch_size,
        grad_accum=d.grad_accum, lr=d.lr, weight_decay=d.weight_decay, adam_betas=tuple(d.adam_betas),
        warmup_steps=d.warmup_steps, lr_schedule=d.lr_schedule, max_grad_norm=d.max_grad_norm,
        gradient_checkpointing=d.gradient_checkpointing, beta=d.beta, loss_type=d.loss_type,
        label_smoothing=d.label_smoothing, rpo_alpha=d.rpo_alpha, average_log_prob=d.average_log_prob,
        fused_loss=d.fused_loss, shared_prompt=d.shared_prompt,
        seed=cfg.run.seed, threads=learner_threads(world_size), pairs_per_forward=d.pairs_per_forward,
        cpu_memory=cfg.distributed.cpu_memory,
    )
