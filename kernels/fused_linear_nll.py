"""A (weighted) negative log-likelihood straight from hidden states, its gradient made in the forward.

The SFT loss is a fixed weighting of per-token log-probs, ``sum_t w_t * -logp_t``, so the
gradient with respect to each token's logits is known as soon as its tile of logits exists:

    logits = h @ W.T                          [C, V] one tile of tokens, full vocabulary rows
    dl     = onehot(targets) - softmax(logits)
    grad_h = -w * (dl @ W)                    [C, H]
    grad_W -= (w * dl).T @ h                  [V, H], accumulated over tiles

Three matmuls per tile and nothing kept but the gradients themselves; the backward only
scales them by the upstream gradient (the loss scale DeepSpeed applies, 1 / accumulation).
``fused_linear_token_logprobs`` cannot do this (its upstream gradient is unknown in the
forward) and pays a fourth matmul to recompute the logits. Same tiles, backends and ZeRO-3
handling as ``fused_linear_preference_loss``.
"""
from __future__ import annotations

import torch

from .fused_linear_logprobs import _add_product_, _Scratch
from .fused_linear_preference import _tile_dlogits_, scaled_forward_grads
from .token_logprobs import resolve_backend, rows_per_chunk
from .zero3 import gathered_weight


class FusedLinearNllLossFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N], token_weights [N] -> sum_t w_t * -logp_t (fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, backend, chunk_tokens,
                needs_grad_hidden, needs_grad_weight):
        stats_dtype = torch.promote_types(hidden.dtype, torch.float32)
        rows = (targets != ignore_index).nonzero().squeeze(1)
        loss = hidden.new_zeros((), dtype=stats_dtype)
        grad_hidden = hidden.new_zeros(hidden.shape) if needs_grad_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=stats_dtype) if needs_grad_weight else None
        tile_tokens = max(1, min(chunk_tokens or rows_per_chunk(weight.shape[0], 4), max(rows.numel(), 1)))
        scratch = _Scratch(hidden, tile_tokens * weight.shape[0], backend)
        for start in range(0, rows.numel(), tile_tokens):
            tile_rows = rows[start:start + tile_tokens]
            hidden_tile = hidden.index_select(0, tile_rows)
            weights = token_weights.index_select(0, tile_rows).to(stats_dtype)
            logits = scratch.project(hidden_tile, weight)
            logprobs = _tile_dlogits_(scratch, logits, targets.index_select(0, tile_rows), backend)
            loss -= (weights * logprobs).sum()
            dlogits = logits  # onehot - softmax, in the matmul dtype
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, tile_rows, ((dlogits @ weight).to(stats_dtype)
                                                       * -weights.unsqueeze(1)).to(hidden.dtype))
            if grad_weight is not None:
                # Scale the [C, H] side, not the [C, V] one: -w folded into the hidden rows.
                scaled_hidden = (hidden_tile.to(stats_dtype) * -weights.unsqueeze(1)).to(hidden.dtype)
                _add_product_(grad_weight, dlogits.t(), scaled_hidden)
        ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.weight = weight
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*scaled_forward_grads(ctx, grad_loss), None, None, None, None, None, None, None)


def fused_linear_nll_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """sum over valid tokens of token_weights * -log softmax(hidden @ W.T)[targets], without full logits.

    Args:
        hidden: [..., H] final hidden states (shifted: position n predicts targets[n]).
        lm_head_weight: [V, H], same dtype as ``hidden``; may be ZeRO-3 partitioned.
        targets: [...] token ids; ``ignore_index`` positions contribute nothing.
        token_weights: [...] fixed weights (no gradient); default 1 (the summed NLL).
        chunk_tokens: tokens per [tokens x V] tile; default ``token_logprobs.TORCH_CHUNK_BYTES`` of fp32.
    Returns:
        [] fp32 loss with gradient for ``hidden`` and ``lm_head_weight``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}; cast one")
    if token_weights is None:
        token_weights = torch.ones(targets.shape, device=targets.device)
    elif token_weights.shape != targets.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} and targets {tuple(targets.shape)} disagree")
    backend = resolve_backend(hidden, backend)
    grad_enabled = torch.is_grad_enabled()
    with gathered_weight(lm_head_weight) as weight:
        return FusedLinearNllLossFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), token_weights.detach().reshape(-1),
            ignore_index, backend, chunk_tokens, grad_enabled and hidden.requires_grad,
            grad_enabled and weight.requires_grad,
        )
