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

``c_s`` is known only once both sequences of a pair are done, so each pair keeps two [V, H]
accumulators (chosen, rejected), folded into grad_W with their coefficients when the pair
ends. Liger instead keeps a pair's full logits (2 x tokens x V); this keeps 2 x V x H, which
does not grow with sequence length, plus one [C x V] tile.

The coefficients come from autograd on the caller's ``pair_loss`` itself (one formula for
the loss, no hand-derived gradients), evaluated after each pair. That is exact when the
derivative for pair i depends only on pair i's log-probs: true for a mean over pairs of
per-pair losses plus terms linear in the log-probs (TRL's RPO NLL). A final full-batch
autograd call checks it and raises if a loss couples pairs otherwise.

Backends: per tile, ``triton`` (CUDA) runs the row kernels of ``token_logprobs`` (forward,
then the backward kernel with unit upstream gradient gives dl in place); ``torch`` (CPU)
does the same with in-place torch ops. Statistics and accumulators are fp32 for half
inputs. ZeRO-3: the partitioned weight is gathered around the call (``zero3.py``); the
backward needs no weight, only ``hold_gathered_for_accumulation`` for grad_W.
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


def _loss_and_gradients(hidden, weight, targets, pair_loss, ignore_index, backend, chunk_tokens,
                        needs_grad_hidden, needs_grad_weight):
    """hidden [2B, T, H], weight [V, H], targets [2B, T] -> (loss, sequence_logps [2B], grad_hidden, grad_weight)."""
    num_seqs, seq_len, hidden_size = hidden.shape
    num_pairs, vocab_size = num_seqs // 2, weight.shape[0]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden_size), targets.reshape(-1)
    valid = flat_targets != ignore_index
    stats_dtype = torch.promote_types(hidden.dtype, torch.float32)
    sequence_logps = hidden.new_zeros(num_seqs, dtype=stats_dtype)
    coefficients = hidden.new_zeros(num_seqs, dtype=stats_dtype)
    # d logp_t / d h_t for every valid token, scaled by its sequence's coefficient at the end.
    basis = hidden.new_zeros((int(valid.sum()), hidden_size), dtype=stats_dtype) if needs_grad_hidden else None
    basis_rows = valid.nonzero().squeeze(1)
    grad_weight = accumulators = None
    if needs_grad_weight:
        grad_weight = weight.new_zeros(weight.shape, dtype=stats_dtype)
        accumulators = [torch.zeros_like(grad_weight), torch.zeros_like(grad_weight)]  # chosen, rejected
    tile_tokens = max(1, min(chunk_tokens or rows_per_chunk(vocab_size, 4), seq_len))
    scratch = _Scratch(hidden, tile_tokens * vocab_size, backend)
    # Where sequence s's valid tokens start in ``basis``.
    basis_offsets = torch.cat([valid.new_zeros(1, dtype=torch.long), valid.view(num_seqs, seq_len).sum(1).cumsum(0)])

    for pair in range(num_pairs):
        for side, seq in enumerate((pair, num_pairs + pair)):
            rows = valid.view(num_seqs, seq_len)[seq].nonzero().squeeze(1) + seq * seq_len
            offset = int(basis_offsets[seq])
            for start in range(0, rows.numel(), tile_tokens):
                tile_rows = rows[start:start + tile_tokens]
                hidden_tile = flat_hidden.index_select(0, tile_rows)
                logits = scratch.project(hidden_tile, weight)
                dlogits = logits  # overwritten in place below
                logprobs = _tile_dlogits_(scratch, logits, flat_targets.index_select(0, tile_rows), backend)
                sequence_logps[seq] += logprobs.sum()
                if basis is not None:
                    basis[offset + start:offset + start + tile_rows.numel()] = dlogits @ weight
                if accumulators is not None:
                    _add_product_(accumulators[side], dlogits.t(), hidden_tile)
        if accumulators is not None:
            grad = _pair_coefficients(pair_loss, sequence_logps, num_pairs)
            for side, seq in enumerate((pair, num_pairs + pair)):
                if grad[seq] != 0:
                    grad_weight.add_(accumulators[side], alpha=grad[seq].item())
                accumulators[side].zero_()

    with torch.enable_grad():  # the loss value, and the coefficients of every sequence at once
        x = sequence_logps.detach().clone().requires_grad_(True)
        loss = pair_loss(x[:num_pairs], x[num_pairs:])
        (coefficients,) = torch.autograd.grad(loss, x)
    if accumulators is not None:
        _check_pairwise(pair_loss, sequence_logps, coefficients, num_pairs)
    grad_hidden = None
    if basis is not None:
        token_coefficients = coefficients.repeat_interleave(basis_offsets.diff())
        grad_hidden = flat_hidden.new_zeros(flat_hidden.shape)
        grad_hidden.index_copy_(0, basis_rows, (basis * token_coefficients.unsqueeze(1)).to(hidden.dtype))
        grad_hidden = grad_hidden.view(hidden.shape)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss.detach(), sequence_logps, grad_hidden, grad_weight


def _check_pairwise(pair_loss, sequence_logps, coefficients, num_pairs) -> None:
    """The per-pair coefficients used for grad_W must equal the full-batch ones (see the module doc)."""
    for pair in range(num_pairs):
        partial = sequence_logps.clone()
        partial[pair + 1:num_pairs] = 0  # what pair ``pair`` saw: later pairs not computed yet
        partial[num_pairs + pair + 1:] = 0
        grad = _pair_coefficients(pair_loss, partial, num_pairs)
        for seq in (pair, num_pairs + pair):
            if not torch.allclose(grad[seq], coefficients[seq], rtol=1e-5, atol=1e-12):
                raise ValueError("pair_loss is not a sum of per-pair terms (plus linear ones): the derivative for "
                                 f"sequence {seq} depends on other pairs ({grad[seq].item()} vs "
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
        grad_hidden, grad_weight = ctx.grads  # freed with the graph (kept for retain_graph)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
            hold_gathered_for_accumulation(ctx.weight)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


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
