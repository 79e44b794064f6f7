"""Per-token log-probs straight from hidden states: ``hidden @ W.T`` is never held whole.

    logits[n] = hidden[n] @ W.T                                    [V]
    logp[n]   = logits[n, targets[n]] / T - logsumexp(logits[n] / T)

    dlogits     = g * (onehot(targets) - softmax(logits / T)) / T  [N, V]  (one tile at a time)
    grad_hidden = dlogits @ W                                      [N, H]
    grad_W      = dlogits.T @ hidden                               [V, H]

Memory. Only tokens whose target is not ``ignore_index`` are projected: prompt and padding
positions cost neither FLOPs nor memory. Nothing of size [N x V] is kept: the forward
keeps a per-token log-sum-exp [N] for the backward, the backward recomputes the logits.
Both work on [token chunk x vocabulary block] tiles of one byte budget
(``token_logprobs.TORCH_CHUNK_BYTES``). Torch path: the forward reduces each tile with an
online log-sum-exp (running max and rescaled sum across vocabulary blocks); the Triton path
projects full-vocabulary chunks and reduces them with the row kernel. The backward turns
each recomputed tile into dlogits in place and applies both matmuls; iterating vocabulary
blocks outermost finishes each block of grad_W before the next starts, so for a bf16/fp16
weight it is summed over token chunks in a small fp32 block buffer, not a [V, H] fp32 copy.
Extra memory: one tile, plus the weight gradient in the backward (Liger's fused DPO loss
chunks over the batch instead, so it holds 2 x T x V logits per pair).

Cost: one more matmul than the naive path (the recomputation), the price of not storing
[N x V] anything; the three others are the same. A frozen head (LoRA, the tied embedding
of a LoRA model) needs only grad_hidden = -g/T * (softmax @ W - W[targets]): the forward
accumulates softmax @ W tile by tile (rescaled online like the sum), the backward is
elementwise, two matmuls in all, as in the naive path.

Precision. Logits are produced in the inputs' dtype (what ``hidden @ W.T`` gives a model);
softmax statistics and all accumulations across tiles (grad_hidden over vocabulary blocks,
grad_W over token chunks) are fp32.

Backends: per chunk or tile, ``triton`` (CUDA) runs the kernels of ``token_logprobs`` on
the logits buffer (the backward kernel overwrites it with dlogits in place); ``torch``
(CPU) runs the same math with in-place torch ops. ``backend="auto"`` chooses by device.

ZeRO-3: a partitioned weight is gathered around the autograd call, again inside the
backward, and held until its gradient is accumulated (see ``zero3.py``); a frozen head is
gathered in the forward only.
"""
from __future__ import annotations

import torch

from . import token_logprobs as _rows
from .token_logprobs import chunk_grad_logits_, resolve_backend, rows_per_chunk
from .zero3 import gathered_weight, hold_gathered_for_accumulation

# Vocabulary columns of a backward tile are at least this many (unless V is smaller), so
# the tile matmuls keep an efficient shape; the token side takes the rest of the budget.
_MIN_VOCAB_BLOCK = 4096


class _Scratch:
    """Buffers reused by every chunk or tile: the matmul output and, on the torch path for
    half dtypes, an fp32 copy for the softmax math. Reusing them avoids faulting in fresh
    pages for every [chunk x V] allocation (costly on CPU). ``view`` hands out contiguous
    [rows, cols] views of the flat storage, so partial tiles stay contiguous too."""

    def __init__(self, like: torch.Tensor, numel: int, backend: str):
        self.logits = like.new_empty(numel)
        needs_fp32_copy = backend == "torch" and like.dtype not in (torch.float32, torch.float64)
        self.fp32 = like.new_empty(numel, dtype=torch.float32) if needs_fp32_copy else None
        self.backend = backend

    def project(self, hidden_chunk: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
        """logits [C, W] = hidden_chunk [C, H] @ weight_rows.T, written into the reused buffer."""
        rows, cols = hidden_chunk.shape[0], weight_rows.shape[0]
        logits = self.logits[: rows * cols].view(rows, cols)
        torch.mm(hidden_chunk, weight_rows.t(), out=logits)
        return logits

    def compute_view(self, logits: torch.Tensor) -> torch.Tensor:
        """The tile in the softmax compute dtype: itself for fp32/fp64, else an fp32 copy."""
        if self.fp32 is None:
            return logits
        scratch = self.fp32[: logits.numel()].view(logits.shape)
        scratch.copy_(logits)
        return scratch


def _forward_chunks(hidden, weight, targets, inv_temperature, backend, chunk_tokens):
    """Triton path. hidden [n, H] (valid tokens only), weight [V, H], targets [n] -> (logprobs [n], lse [n]), fp32.

    Each chunk of ``chunk_tokens`` tokens gets its full [chunk x V] logits, reduced by the row kernel.
    """
    n, vocab_size = hidden.shape[0], weight.shape[0]
    logprobs = hidden.new_empty(n, dtype=torch.float32)
    lse = hidden.new_empty(n, dtype=torch.float32)
    if n == 0:
        return logprobs, lse
    chunk_tokens = min(chunk_tokens, n)
    scratch = _Scratch(hidden, chunk_tokens * vocab_size, backend)
    all_rows = torch.arange(chunk_tokens, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        logits = scratch.project(hidden[start:end], weight)
        _rows.triton_forward_rows(logits, targets[start:end], all_rows[: end - start],
                                  logprobs[start:end], lse[start:end], inv_temperature)
    return logprobs, lse


def _forward_tiles(hidden, weight, targets, inv_temperature, chunk_tokens, frozen_weight_grad):
    """Torch path: online log-sum-exp over [tokens x vocabulary] tiles (the backward's tiles).

    hidden [n, H] (valid tokens only), weight [V, H], targets [n] -> (logprobs [n], lse [n],
    hidden_grad_basis [n, H] or None), statistics in fp32 (fp64 for fp64 inputs).

    Tiles rather than full-vocabulary rows: within the same byte budget the matmuls keep
    thousands of tokens on their row side (full rows of V=151936 allow ~220).

    ``frozen_weight_grad`` (the weight needs no gradient, the hidden states do): also
    accumulate E[n] = softmax(logits[n] / T) @ W, rescaled online like the sum, and return
    E - W[targets]; then d logp[n] / d hidden[n] = -(E[n] - W[targets[n]]) / T, and the
    backward needs no matmul and no weight at all (two matmuls in all instead of three).
    """
    n, vocab_size = hidden.shape[0], weight.shape[0]
    stats_dtype = torch.promote_types(hidden.dtype, torch.float32)
    running_max = hidden.new_full((n,), float("-inf"), dtype=stats_dtype)
    running_sum = hidden.new_zeros(n, dtype=stats_dtype)
    target_logit = hidden.new_zeros(n, dtype=stats_dtype)
    basis = hidden.new_zeros((n, hidden.shape[1]), dtype=stats_dtype) if frozen_weight_grad else None
    if n == 0:
        return target_logit, running_sum, basis
    tile_tokens, tile_vocab = _tile_shape(n, vocab_size, chunk_tokens)
    scratch = _Scratch(hidden, tile_tokens * tile_vocab, "torch")
    for v_start in range(0, vocab_size, tile_vocab):
        v_end = min(v_start + tile_vocab, vocab_size)
        weight_block = weight[v_start:v_end]
        for t_start in range(0, n, tile_tokens):
            t_end = min(t_start + tile_tokens, n)
            logits = scratch.project(hidden[t_start:t_end], weight_block)
            tile = scratch.compute_view(logits)
            if inv_temperature != 1.0:
                tile.mul_(inv_temperature)
            local_targets = targets[t_start:t_end] - v_start
            in_tile = ((local_targets >= 0) & (local_targets < v_end - v_start)).nonzero().squeeze(1)
            target_logit[t_start + in_tile] = tile[in_tile, local_targets[in_tile]]
            old_max = running_max[t_start:t_end]
            new_max = torch.maximum(old_max, tile.amax(dim=1))
            rescale = (old_max - new_max).exp_()  # 0 on the first tile (exp(-inf))
            tile.sub_(new_max.unsqueeze(1)).exp_()  # exp(x - max), in place
            running_sum[t_start:t_end] = running_sum[t_start:t_end] * rescale + tile.sum(dim=1)
            running_max[t_start:t_end] = new_max
            if basis is not None:
                block_basis = basis[t_start:t_end].mul_(rescale.unsqueeze(1))
                if tile is not logits:
                    logits.copy_(tile)  # matmuls cannot mix dtypes
                _add_product_(block_basis, logits, weight_block)
    if basis is not None:
        basis.div_(running_sum.unsqueeze(1)).sub_(weight.index_select(0, targets).to(stats_dtype))
    log_sum = running_sum.log_()
    logprobs = (target_logit - running_max) - log_sum  # no cancellation, as in log_softmax
    lse = running_max.add_(log_sum)
    return logprobs, lse, basis


def _tile_shape(n: int, vocab_size: int, chunk_tokens: int | None) -> tuple[int, int]:
    """(tokens, vocabulary columns) of a tile of about TORCH_CHUNK_BYTES in fp32."""
    budget = max(1, _rows.TORCH_CHUNK_BYTES // 4)
    min_block = min(vocab_size, _MIN_VOCAB_BLOCK)
    tile_tokens = max(1, min(n, chunk_tokens or budget // min_block))
    tile_vocab = max(min_block, min(vocab_size, budget // tile_tokens))
    return tile_tokens, tile_vocab


def _add_product_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator += a @ b, with an fp32 accumulator for half-precision a and b."""
    if accumulator.dtype == a.dtype:
        accumulator.addmm_(a, b)
    else:  # matmuls cannot mix dtypes; the product is one small tile
        accumulator.add_(a @ b)


def _backward_tiles(hidden, weight, targets, lse, grad_logprobs, inv_temperature, backend, chunk_tokens,
                    needs_grad_hidden, needs_grad_weight):
    """Recompute each [tokens x vocab] tile, turn it into dlogits, apply both matmuls.

    Returns (grad_hidden [n, H] in hidden's dtype or None, grad_weight [V, H] in weight's dtype or None).
    """
    n, vocab_size = hidden.shape[0], weight.shape[0]
    accumulate_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_hidden = torch.zeros(hidden.shape, dtype=accumulate_dtype, device=hidden.device) if needs_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if needs_grad_weight else None
    if n == 0:
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype)), grad_weight
    tile_tokens, tile_vocab = _tile_shape(n, vocab_size, chunk_tokens)
    scratch = _Scratch(hidden, tile_tokens * tile_vocab, backend)
    all_rows = torch.arange(tile_tokens, device=hidden.device)
    half_weight = accumulate_dtype != weight.dtype
    block_accumulator = weight.new_empty((tile_vocab, weight.shape[1]), dtype=accumulate_dtype) if half_weight else None
    for v_start in range(0, vocab_size, tile_vocab):
        v_end = min(v_start + tile_vocab, vocab_size)
        weight_block = weight[v_start:v_end]
        if needs_grad_weight:  # fp32 weights accumulate straight into their gradient block
            block_grad = block_accumulator[: v_end - v_start].zero_() if half_weight else grad_weight[v_start:v_end]
        for t_start in range(0, n, tile_tokens):
            t_end = min(t_start + tile_tokens, n)
            hidden_chunk = hidden[t_start:t_end]
            logits = scratch.project(hidden_chunk, weight_block)
            if backend == "triton":
                _rows.triton_backward_rows(logits, targets[t_start:t_end], all_rows[: t_end - t_start],
                                           lse[t_start:t_end], grad_logprobs[t_start:t_end], logits,
                                           inv_temperature, col_offset=v_start)
            else:
                tile = scratch.compute_view(logits)
                chunk_grad_logits_(tile, targets[t_start:t_end], lse[t_start:t_end], grad_logprobs[t_start:t_end],
                                   inv_temperature, col_offset=v_start)
                if tile is not logits:
                    logits.copy_(tile)  # back to the matmul dtype
            dlogits = logits
            if needs_grad_hidden:
                _add_product_(grad_hidden[t_start:t_end], dlogits, weight_block)
            if needs_grad_weight:
                _add_product_(block_grad, dlogits.t(), hidden_chunk)
        if needs_grad_weight and half_weight:
            grad_weight[v_start:v_end] = block_grad
    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> logprobs [N] fp32 (0 where ignored)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, inv_temperature, backend, chunk_tokens,
                frozen_weight_grad):
        rows = (targets != ignore_index).nonzero().squeeze(1)
        # Compact to the valid tokens once: [n, H] is small next to any [n, V] buffer.
        hidden_valid = hidden.index_select(0, rows)
        targets_valid = targets.index_select(0, rows)
        hidden_grad_basis = None
        with gathered_weight(weight):
            if backend == "triton" and not frozen_weight_grad:
                forward_rows = chunk_tokens or rows_per_chunk(weight.shape[0], 4)
                logprobs_valid, lse = _forward_chunks(
                    hidden_valid, weight, targets_valid, inv_temperature, backend, forward_rows
                )
            else:  # torch ops on tiles; on CUDA too for a frozen head (two matmuls, no row kernel needed)
                logprobs_valid, lse, hidden_grad_basis = _forward_tiles(
                    hidden_valid, weight, targets_valid, inv_temperature, chunk_tokens, frozen_weight_grad
                )
        logprobs = logprobs_valid.new_zeros(targets.shape[0])  # fp32 (fp64 for fp64 inputs: gradcheck)
        logprobs[rows] = logprobs_valid
        if hidden_grad_basis is not None:
            # Frozen head: the backward needs only E - W[targets]; no weight, no recomputation.
            ctx.save_for_backward(hidden_grad_basis, rows)
        else:
            ctx.save_for_backward(hidden_valid, targets_valid, rows, lse)
        # The weight is kept as the Parameter object, not via save_for_backward: under
        # ZeRO-3 its .data is swapped for an empty shard after the forward and must be
        # gathered again (through its ds_* attributes) in the backward.
        ctx.weight = weight
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.inv_temperature, ctx.backend, ctx.chunk_tokens = inv_temperature, backend, chunk_tokens
        ctx.frozen_weight_grad = hidden_grad_basis is not None
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        needs_grad_hidden, needs_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.frozen_weight_grad:
            hidden_grad_basis, rows = ctx.saved_tensors
            scale = grad_logprobs.index_select(0, rows).to(hidden_grad_basis.dtype) * -ctx.inv_temperature
            grad_hidden = hidden_grad_basis.new_zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype)
            grad_hidden.index_copy_(0, rows, (hidden_grad_basis * scale.unsqueeze(1)).to(ctx.hidden_dtype))
            return grad_hidden, None, None, None, None, None, None, None
        hidden_valid, targets_valid, rows, lse = ctx.saved_tensors
        grad_valid = grad_logprobs.index_select(0, rows)
        # Gather even when this rank has no valid token: the other ranks' gathers are collectives.
        with gathered_weight(ctx.weight) as weight:
            grad_hidden_valid, grad_weight = _backward_tiles(
                hidden_valid, weight, targets_valid, lse, grad_valid, ctx.inv_temperature, ctx.backend,
                ctx.chunk_tokens, needs_grad_hidden, needs_grad_weight,
            )
        grad_hidden = None
        if needs_grad_hidden:
            grad_hidden = hidden_valid.new_zeros(ctx.hidden_shape)
            grad_hidden.index_copy_(0, rows, grad_hidden_valid)
        if needs_grad_weight:
            hold_gathered_for_accumulation(ctx.weight)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ lm_head_weight.T / temperature)[targets] without full logits.

    Args:
        hidden: [..., H] final hidden states (already shifted so position n predicts targets[n]).
        lm_head_weight: [V, H], same dtype as ``hidden``; may be a ZeRO-3 partitioned parameter
            (gathered here; see ``zero3.gathered_weight``). No bias (Llama/Qwen heads have none).
        targets: [...] int64 token ids; ``ignore_index`` positions give 0 and no gradient.
        temperature: divides the logits before the softmax (> 0).
        backend: 'auto' (Triton on CUDA, torch chunks elsewhere), 'triton' or 'torch'.
        chunk_tokens: valid tokens per forward chunk and per backward tile; the default
            sizes both to ``token_logprobs.TORCH_CHUNK_BYTES`` (128 MiB) of fp32.
    Returns:
        [...] fp32 log-probs with the shape of ``targets``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}; cast one")
    backend = resolve_backend(hidden, backend)
    # Gather around apply(), not only inside forward(): autograd records the weight's
    # gradient slot (its shape) when the graph node is built, and it must see [V, H].
    # Known here, not inside forward(): the same on every rank, so ZeRO-3 gathers stay in step.
    frozen_weight_grad = torch.is_grad_enabled() and hidden.requires_grad and not lm_head_weight.requires_grad
    with gathered_weight(lm_head_weight) as weight:
        logprobs = FusedLinearTokenLogprobsFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            ignore_index,
            1.0 / temperature,
            backend,
            chunk_tokens,
            frozen_weight_grad,
        )
    return logprobs.view(targets.shape)
