"""Two-rank ZeRO-3 check of fused_linear_token_logprobs, fused_linear_nll_loss and fused_linear_preference_loss, launched by test_zero3_fused_linear.py.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT tests/kernels/zero3_worker.py OUT_DIR

Each rank trains a tiny head-on-embedding model, wrapped by deepspeed.initialize with ZeRO-3
(persistence threshold 0, so even these tiny parameters are partitioned), on its own
micro-batch: rank 0 has many valid tokens over several chunks, rank 1 has few or none, so
the ranks run different numbers of chunks (the TRL 6696 hang) and a rank may have no work
at all. The fused head runs inside the engine's forward (DeepSpeed gathers the weight on
attribute access there) and outside it, after the forward (only gathered_weight gathers).

Every rank also builds the same model without DeepSpeed and computes, in one process, the
naive log-probs of both ranks' batches and the rank-averaged gradients (what ZeRO's
reduce-scatter averages to). Each rank writes a JSON of max abs differences per
configuration: untied head or tied embeddings (lm_head.weight is embed.weight, as in
SmolLM2), head inside or outside the engine's forward.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch

VOCAB, HIDDEN, SEQ = 301, 24, 37
CHUNK_TOKENS = 8


class TinyLM(torch.nn.Module):
    """embed -> linear -> tanh -> (fused) head; forward returns per-token log-probs [B, T]."""

    def __init__(self, tied: bool, fused: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.fused = fused
        self.last_hidden = None

    def forward(self, input_ids, targets=None):
        hidden = torch.tanh(self.proj(self.embed(input_ids)))
        hidden.retain_grad()
        self.last_hidden = hidden
        if targets is None:  # the head is applied by the caller, outside this forward
            return hidden
        if self.fused:
            from selfrefine_dist.kernels import fused_linear_token_logprobs

            return fused_linear_token_logprobs(hidden, self.lm_head.weight, targets, chunk_tokens=CHUNK_TOKENS)
        from selfrefine_dist.kernels import naive_linear_token_logprobs

        return naive_linear_token_logprobs(hidden, self.lm_head.weight, targets)


def rank_batch(rank: int):
    """Rank 0: 2 x 37 tokens, most valid. Rank 1: 1 x 37 tokens, 3 valid (or none when tied)."""
    gen = torch.Generator().manual_seed(100 + rank)
    batch = 2 if rank == 0 else 1
    input_ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    weights = torch.randn(batch, SEQ, generator=gen)  # distinct per-token upstream gradients
    if rank == 0:
        targets[:, :5] = -100
    else:
        targets[:, 3:] = -100
    return input_ids, targets, weights


def zero3_engine(model):
    """``model`` under ZeRO-3 with every parameter partitioned (persistence threshold 0), SGD."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def finish(engine, reference, result: dict) -> dict:
    """Add each parameter's max gradient difference from ``reference`` (and the reference's norm) to
    ``result``; step (the optimizer must accept the reduced partitions) and release the engine."""
    from deepspeed.utils import safe_get_full_grad

    ref_params = dict(reference.named_parameters())
    for name, param in engine.module.named_parameters():
        result[f"grad/{name}"] = (safe_get_full_grad(param) - ref_params[name].grad).abs().max().item()
        result[f"grad_norm/{name}"] = ref_params[name].grad.norm().item()
    engine.step()
    engine.destroy()
    return result


def check(tied: bool, head_outside: bool, rank: int, world_size: int, nll: bool = False) -> dict:
    """Run one configuration; ``head_outside`` applies the fused head after engine(...) returns.

    ``nll``: the head outside, through fused_linear_nll_loss with token weights -w, whose value
    sum(w * logp) is the same scalar the other configurations backpropagate."""
    torch.manual_seed(0)
    reference = TinyLM(tied=tied, fused=False)
    model = copy.deepcopy(reference)
    model.fused = True
    if tied:
        assert model.lm_head.weight is model.embed.weight

    # Reference: both ranks' losses in one process; ZeRO averages gradients over ranks.
    batches = [rank_batch(r) for r in range(world_size)]
    if tied:  # the tied run also covers a rank with no valid token at all
        batches[1][1].fill_(-100)
    ref_logps, ref_hidden_grads = [], []
    for input_ids, targets, weights in batches:
        logps = reference(input_ids, targets)
        ((logps * weights).sum() / world_size).backward()
        ref_logps.append(logps.detach())
        # d(rank loss)/d hidden: undo the 1/world_size, which ZeRO applies to parameters only
        ref_hidden_grads.append(reference.last_hidden.grad * world_size)

    engine = zero3_engine(model)
    head = engine.module.lm_head.weight
    assert head.numel() == 0 and tuple(head.ds_shape) == (VOCAB, HIDDEN), "the head must be partitioned"

    input_ids, targets, weights = batches[rank]
    if head_outside:
        # TRL issue 4544's setting: the loss reads lm_head.weight after the model forward,
        # where DeepSpeed neither gathers it nor registers it; gathered_weight must.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from selfrefine_dist.kernels import fused_linear_token_logprobs

        hidden = engine(input_ids)
        assert head.ds_status == ZeroParamStatus.NOT_AVAILABLE
        if nll:
            from selfrefine_dist.kernels import fused_linear_nll_loss

            loss = fused_linear_nll_loss(hidden, engine.module.lm_head.weight, targets, -weights,
                                         chunk_tokens=CHUNK_TOKENS)
        else:
            logps = fused_linear_token_logprobs(hidden, engine.module.lm_head.weight, targets,
                                                chunk_tokens=CHUNK_TOKENS)
    else:
        # Inside a module forward DeepSpeed gathers a parameter read by attribute and
        # registers it as external to that module; gathered_weight must then be a no-op.
        logps = engine(input_ids, targets)
    # Scale by 1: ZeRO-3's reduce-scatter averages over ranks like the reference's / world_size.
    if nll:
        engine.backward(loss)
        want = (ref_logps[rank] * weights).sum()  # a sum of 64 terms: compared relative to its size
        logps_error = (loss.detach() - want).abs().item() / max(1.0, want.abs().item())
    else:
        engine.backward((logps * weights).sum())
        logps_error = (logps.detach() - ref_logps[rank]).abs().max().item()

    result = {
        "logps": logps_error,
        "hidden_grad": (engine.module.last_hidden.grad - ref_hidden_grads[rank]).abs().max().item(),
        "hidden_grad_norm": ref_hidden_grads[rank].norm().item(),
        "valid_tokens": int((targets != -100).sum()),
    }
    return finish(engine, reference, result)


def pair_batch(rank: int):
    """Preference micro-batches, chosen rows then rejected: rank 0 two pairs, rank 1 one pair, 3 tokens each."""
    gen = torch.Generator().manual_seed(200 + rank)
    rows = 4 if rank == 0 else 2
    input_ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    targets[:, :5] = -100  # the prompt
    if rank == 1:
        targets[:, 8:] = -100
    return input_ids, targets


def pair_loss_for(targets):
    from selfrefine_dist.losses import dpo_loss

    pairs = targets.shape[0] // 2
    lengths = (targets != -100).sum(1)
    ref = torch.linspace(-40.0, -20.0, 2 * pairs)

    def pair_loss(chosen, rejected):
        return dpo_loss(chosen, rejected, ref[:pairs], ref[pairs:], 0.1, chosen_lengths=lengths[:pairs],
                        rejected_lengths=lengths[pairs:], rpo_alpha=0.5).loss

    return pair_loss


def check_preference(tied: bool, rank: int, world_size: int) -> dict:
    """fused_linear_preference_loss on the head outside the engine's forward, against autograd of
    naive log-probs -> dpo_loss in one process (gradients averaged over ranks, as ZeRO does)."""
    from selfrefine_dist.kernels import fused_linear_preference_loss, naive_linear_token_logprobs

    torch.manual_seed(0)
    reference = TinyLM(tied=tied, fused=False)
    model = copy.deepcopy(reference)
    ref_losses, ref_hidden_grads = [], []
    for r in range(world_size):
        input_ids, targets = pair_batch(r)
        hidden = reference(input_ids)
        logps = naive_linear_token_logprobs(hidden, reference.lm_head.weight, targets).sum(-1)
        pairs = targets.shape[0] // 2
        loss = pair_loss_for(targets)(logps[:pairs], logps[pairs:])
        (loss / world_size).backward()
        ref_losses.append(loss.detach())
        ref_hidden_grads.append(reference.last_hidden.grad * world_size)

    engine = zero3_engine(model)
    input_ids, targets = pair_batch(rank)
    hidden = engine(input_ids)
    loss, _ = fused_linear_preference_loss(hidden, engine.module.lm_head.weight, targets, pair_loss_for(targets),
                                           chunk_tokens=CHUNK_TOKENS)
    engine.backward(loss)
    result = {
        "logps": (loss.detach() - ref_losses[rank]).abs().item(),
        "hidden_grad": (engine.module.last_hidden.grad - ref_hidden_grads[rank]).abs().max().item(),
        "hidden_grad_norm": ref_hidden_grads[rank].norm().item(),
        "valid_tokens": int((targets != -100).sum()),
    }
    return finish(engine, reference, result)


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {
        f"{'tied' if tied else 'untied'}/{'outside' if outside else 'inside'}": check(tied, outside, rank, world_size)
        for tied in (False, True)
        for outside in (False, True)
    }
    for tied in (False, True):
        name = "tied" if tied else "untied"
        results[f"{name}/nll"] = check(tied, True, rank, world_size, nll=True)
        results[f"{name}/preference"] = check_preference(tied, rank, world_size)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
