"""A preference loss (DPO family) straight from hidden states, its gradient computed in the forward.

``fused_linear_token_logprobs`` returns per-token log-probs, so its backward must recompute
the logits: four [tokens x vocab x hidden] matmuls in all, one more than the naive path.
A preference loss needs only one scalar per sequence, and its gradient with respect to a
token's log-prob is a per-sequence constant ``c_s = d loss / d logp(sequence s)``. So the
forward can produce the gradients while each logits tile is still at hand (as Liger's
fused DPO loss does), three matmuls per tile, and the backward only scales them:

    logits = h @ W.T                                   [C, V] one tile of one sequence
    dl     = onehot(targets) - softmax(logits)         d logp_t / d logits, in place
    basis  = dl @ W                                    [C, H] d logp_t / d h_t
    G_s   += dl.T @ h                                  [V, H] d logp(sequence s) / d W

    grad_hidden[t] = c_s * basis[t]      grad_W = sum_s c_s * G_s

``c_s`` is known only once both sequences of a pair are done. Pairs whose tokens fit one
tile together (short responses: the learners' usual case) are done as one tile: its dl rows
are scaled by their pairs' coefficients, then both gradient matmuls run on the whole tile. A
pair longer than a tile is tiled per sequence into two [V, H] accumulators (chosen,
rejected), folded into grad_W with their coefficients when the pair ends. Liger instead
keeps a pair's full logits (2 x tokens x V); this keeps at most one tile and 2 x V x H,
which does not grow with sequence length.

The coefficients come from autograd on the caller's ``pair_loss`` itself (one formula for
the loss, no hand-derived gradients), evaluated after each pair. That is exact when the
derivative for pair i depends only on pair i's log-probs: true for a mean over pairs of
per-pair losses plus terms linear in the log-probs (TRL's RPO NLL). A final full-batch
autograd call checks it and raises if a loss couples pairs otherwise.

Backends: per tile, ``triton`` (CUDA) runs the row kernels of ``token_logprobs`` (forward,
then the backward kernel with unit upstream gradient gives dl in place); ``torch`` (CPU)
does the same with in-place torch ops. Statistics and accumulators are fp32 for half
inputs. grad_W of a call that is a single tile (one pair per forward: the CPU learners) is
that tile's product itself, in the weight's dtype: what an fp32 accumulator starting at zero
would round back to, without a [V, H] fp32 buffer to zero, add into and convert (on a CPU
those passes over V x H cost more than the matmul). ZeRO-3: the partitioned weight is
gathered around the call (``zero3.py``); the backward needs no weight, only
``hold_gathered_for_accumulation`` for grad_W.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import token_logprobs as _rows
from .fused_linear_logprobs import _add_product_, _Scratch
from .token_logprobs import resolve_backend, rows_per_chunk
from .zero3 import gathered_weight, hold_gathered_for_accumulation

PairLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _tile_dlogits_(scratch: _Scratch, logits: torch.Tensor, targets: torch.Tensor, backend: str) -> torch.Tensor:
    """Overwrite ``logits`` [C, V] with onehot(targets) - softmax(logits); return logp(targets) [C] fp32."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if backend == "triton":
        logprobs = logits.new_empty(logits.shape[0], dtype=torch.float32)
        lse = torch.empty_like(logprobs)
        _rows.triton_forward_rows(logits, targets, rows, logprobs, lse, 1.0)
        ones = torch.ones_like(logprobs)
        _rows.triton_backward_rows(logits, targets, rows, lse, ones, logits, 1.0)
        return logprobs
    tile = scratch.compute_view(logits)  # fp32 (fp64 for fp64) view or copy
    target_logits = tile[rows, targets]
    row_max = tile.amax(dim=1, keepdim=True)
    sums = tile.sub_(row_max).exp_().sum(dim=1, keepdim=True)
    logprobs = (target_logits - row_max.squeeze(1)) - sums.squeeze(1).log()
    tile.div_(sums).neg_()
    tile[rows, targets] += 1.0
    if tile is not logits:
        logits.copy_(tile)  # back to the matmul dtype
    return logprobs


def _pair_coefficients(pair_loss: PairLoss, sequence_logps: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """d pair_loss / d sequence_logps [2B] at ``sequence_logps`` (chosen first, then rejected)."""
    with torch.enable_grad():
        x = sequence_logps.detach().clone().requires_grad_(True)
        loss = pair_loss(x[:num_pairs], x[num_pairs:])
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _pair_groups(pair_tokens: list[int], budget: int) -> list[list[int]]:
    """Consecutive pairs whose valid tokens fit one tile of ``budget`` rows; a longer pair stands alone."""
    groups, current, size = [], [], 0
    for pair, n in enumerate(pair_tokens):
        if current and size + n > budget:
            groups.append(current)
            current, size = [], 0
        current.append(pair)
        size += n
    return groups + [current] if current else groups


def _loss_and_gradients(hidden, weight, targets, pair_loss, ignore_index, backend, chunk_tokens,
                        needs_grad_hidden, needs_grad_weight):
    """hidden [2B, T, H], weight [V, H], targets [2B, T] -> (loss, sequence_logps [2B], grad_hidden, grad_weight).

    Pairs go in groups that fit one tile (short responses, the common case): the group's dl rows
    are scaled by their coefficients and both gradient matmuls run on the whole tile. A pair
    longer than a tile is tiled per sequence into the two [V, H] accumulators instead.
    """
    num_seqs, seq_len, hidden_size = hidden.shape
    num_pairs, vocab_size = num_seqs // 2, weight.shape[0]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden_size), targets.reshape(-1)
    valid = flat_targets != ignore_index
    stats_dtype = torch.promote_types(hidden.dtype, torch.float32)
    sequence_logps = hidden.new_zeros(num_seqs, dtype=stats_dtype)
    used_coefficients = hidden.new_zeros(num_seqs, dtype=stats_dtype)  # what grad_W was built with
    seq_rows = [valid[s * seq_len:(s + 1) * seq_len].nonzero().squeeze(1) + s * seq_len for s in range(num_seqs)]
    # d logp_t / d h_t for every valid token (row order of ``valid``), scaled by its sequence's coefficient at the end.
    basis = hidden.new_zeros((int(valid.sum()), hidden_size), dtype=stats_dtype) if needs_grad_hidden else None
    basis_index = torch.cumsum(valid, 0) - 1  # flat row -> its row in ``basis``
    grad_weight = None  # [V, H]: the first tile's product (weight dtype), fp32 once a second one adds
    accumulators = None  # [V, H] x 2, made for the first pair longer than a tile
    budget = max(1, chunk_tokens or rows_per_chunk(vocab_size, 4))
    pair_tokens = [seq_rows[p].numel() + seq_rows[num_pairs + p].numel() for p in range(num_pairs)]
    groups = _pair_groups(pair_tokens, budget)
    tile_rows = max([min(budget, sum(pair_tokens[p] for p in g)) for g in groups] + [1])
    scratch = _Scratch(hidden, tile_rows * vocab_size, backend)

    def tile_pass(rows):
        """Logits of ``rows`` -> dl in place; fills their basis rows; returns (dl, hidden rows, logp)."""
        hidden_rows = flat_hidden.index_select(0, rows)
        logits = scratch.project(hidden_rows, weight)
        logprobs = _tile_dlogits_(scratch, logits, flat_targets.index_select(0, rows), backend)
        if basis is not None:
            basis.index_copy_(0, basis_index.index_select(0, rows), (logits @ weight).to(stats_dtype))
        return logits, hidden_rows, logprobs

    for group in groups:
        seqs = [s for pair in group for s in (pair, num_pairs + pair)]
        if sum(pair_tokens[p] for p in group) <= budget:  # one tile: scale dl rows, two matmuls
            rows = torch.cat([seq_rows[s] for s in seqs])
            owner = torch.cat([torch.full_like(seq_rows[s], s) for s in seqs])
            if rows.numel() == 0:
                continue
            dlogits, hidden_rows, logprobs = tile_pass(rows)
            sequence_logps.index_add_(0, owner, logprobs.to(stats_dtype))
            if needs_grad_weight:
                grad = _pair_coefficients(pair_loss, sequence_logps, num_pairs)
                used_coefficients[seqs] = grad[seqs]
                dlogits.mul_(grad.index_select(0, owner).to(dlogits.dtype).unsqueeze(1))
                if grad_weight is None:  # == zeros(fp32) + this product, rounded back to the weight's dtype
                    grad_weight = dlogits.t() @ hidden_rows
                else:
                    grad_weight = grad_weight.to(stats_dtype)  # a no-op once it is fp32
                    _add_product_(grad_weight, dlogits.t(), hidden_rows)
            continue
        (pair,) = group  # longer than a tile: per sequence, tile by tile, into the accumulators
        if needs_grad_weight:
            grad_weight = weight.new_zeros(weight.shape, dtype=stats_dtype) if grad_weight is None \
                else grad_weight.to(stats_dtype)
        if needs_grad_weight and accumulators is None:
            accumulators = [torch.zeros_like(grad_weight), torch.zeros_like(grad_weight)]  # chosen, rejected
        for side, seq in enumerate(seqs):
            for start in range(0, seq_rows[seq].numel(), budget):
                dlogits, hidden_rows, logprobs = tile_pass(seq_rows[seq][start:start + budget])
                sequence_logps[seq] += logprobs.sum()
                if accumulators is not None:
                    _add_product_(accumulators[side], dlogits.t(), hidden_rows)
        if accumulators is not None:
            grad = _pair_coefficients(pair_loss, sequence_logps, num_pairs)
            for side, seq in enumerate(seqs):
                used_coefficients[seq] = grad[seq]
                if grad[seq] != 0:
                    grad_weight.add_(accumulators[side], alpha=grad[seq].item())
                accumulators[side].zero_()

    with torch.enable_grad():  # the loss value, and the coefficients of every sequence at once
        x = sequence_logps.detach().clone().requires_grad_(True)
        loss = pair_loss(x[:num_pairs], x[num_pairs:])
        (coefficients,) = torch.autograd.grad(loss, x)
    if needs_grad_weight:
        _check_pairwise(used_coefficients, coefficients, [s.numel() > 0 for s in seq_rows])
        if grad_weight is None:  # no response tokens at all
            grad_weight = torch.zeros_like(weight)
    grad_hidden = None
    if basis is not None:
        token_coefficients = coefficients.repeat_interleave(torch.tensor([r.numel() for r in seq_rows],
                                                                         device=hidden.device))
        grad_hidden = flat_hidden.new_zeros(flat_hidden.shape)
        grad_hidden.index_copy_(0, valid.nonzero().squeeze(1),
                                (basis * token_coefficients.unsqueeze(1)).to(hidden.dtype))
        grad_hidden = grad_hidden.view(hidden.shape)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss.detach(), sequence_logps, grad_hidden, grad_weight


def _check_pairwise(used, coefficients, has_tokens) -> None:
    """grad_W was built with each pair's coefficients as soon as the pair was done (later pairs
    still unknown); they must equal the full batch's (see the module doc)."""
    for seq, present in enumerate(has_tokens):
        if present and not torch.allclose(used[seq], coefficients[seq], rtol=1e-5, atol=1e-12):
            raise ValueError("pair_loss is not a sum of per-pair terms (plus linear ones): the derivative for "
                             f"sequence {seq} depends on other pairs ({used[seq].item()} vs "
                             f"{coefficients[seq].item()}); use fused_linear_token_logprobs and autograd")


class FusedLinearPreferenceLossFunction(torch.autograd.Function):
    """hidden [2B, T, H], weight [V, H], targets [2B, T] -> (loss [], sequence_logps [2B] no grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, pair_loss, ignore_index, backend, chunk_tokens,
                needs_grad_hidden, needs_grad_weight):
        loss, sequence_logps, grad_hidden, grad_weight = _loss_and_gradients(
            hidden, weight, targets, pair_loss, ignore_index, backend, chunk_tokens,
            needs_grad_hidden, needs_grad_weight,
        )
        ctx.grads = (grad_hidden, grad_weight)  # not saved tensors: made here, only scaled in the backward
        ctx.weight = weight
        ctx.mark_non_differentiable(sequence_logps)
        return loss, sequence_logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_sequence_logps):
        return (*scaled_forward_grads(ctx, grad_loss), None, None, None, None, None, None, None)


def scaled_forward_grads(ctx, grad_loss):
    """The backward of a loss whose forward made its gradients: (grad_hidden, grad_weight) in
    ``ctx.grads`` (kept, for retain_graph) times the upstream scalar. A scale of 1 (read on CPU
    only: ``.item()`` would sync a GPU) hands them on as they are: autograd adds them where they
    go without writing into them, and a fresh [V, H] product costs a pass over pages never touched
    on a CPU. A ZeRO-3 weight is held gathered until its gradient is accumulated."""
    grad_hidden, grad_weight = ctx.grads
    unit = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
    if grad_hidden is not None and not unit:
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
    if grad_weight is not None:
        if not unit:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        hold_gathered_for_accumulation(ctx.weight)
    return grad_hidden, grad_weight


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    pair_loss: PairLoss,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_loss of the summed response log-probs, from hidden states, without full logits.

    Args:
        hidden: [2B, T, H] final hidden states, B chosen sequences then their B rejected ones,
            already shifted so position t predicts targets[:, t].
        lm_head_weight: [V, H], same dtype as ``hidden``; may be ZeRO-3 partitioned.
        targets: [2B, T] token ids; ``ignore_index`` on prompt and padding positions.
        pair_loss: (chosen_logps [B], rejected_logps [B]) -> scalar loss, e.g.
            ``lambda c, r: dpo_loss(c, r, ref_c, ref_r, ...).loss``. It must be a mean or sum of
            per-pair terms plus terms linear in the log-probs (checked).
        chunk_tokens: tokens per [tokens x V] tile; default ``token_logprobs.TORCH_CHUNK_BYTES`` of fp32.
    Returns:
        (loss [] with gradient, sequence_logps [2B] fp32 without gradient: the summed log-probs
        the loss saw, for metrics).
    """
    if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden must be [2B, T, H] and targets [2B, T]; got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}; cast one")
    backend = resolve_backend(hidden, backend)
    grad_enabled = torch.is_grad_enabled()
    with gathered_weight(lm_head_weight) as weight:
        return FusedLinearPreferenceLossFunction.apply(
            hidden, weight, targets, pair_loss, ignore_index, backend, chunk_tokens,
            grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
        )
