"""Per-token log-probs straight from hidden states: ``hidden @ W.T`` is never held whole.

    logits[n] = hidden[n] @ W.T                                    [V]
    logp[n]   = logits[n, targets[n]] / T - logsumexp(logits[n] / T)

    dlogits     = g * (onehot(targets) - softmax(logits / T)) / T  [N, V]  (one tile at a time)
    grad_hidden = dlogits @ W                                      [N, H]
    grad_W      = dlogits.T @ hidden                               [V, H]

Memory. Only tokens whose target is not ``ignore_index`` are projected: prompt and padding
positions cost neither FLOPs nor memory. The forward chunks over tokens: ``chunk_tokens``
valid tokens at a time get their full [chunk x V] logits, folded into log-probs and a
per-token log-sum-exp [N], the only thing kept for the backward (Liger's fused DPO loss
chunks over the batch instead, so it holds 2 x T x V logits per pair). The backward
recomputes the logits tile by tile ([token chunk x vocabulary block], within the same
byte budget), turns each tile into dlogits in place and applies both matmuls. Iterating
vocabulary blocks outermost means each block of grad_W is finished before the next one
starts, so it is written once, and for a bf16/fp16 weight it is summed over token chunks
in a small fp32 block buffer instead of a [V, H] fp32 copy. Extra memory: one [chunk x V]
buffer in the forward, one tile and the weight gradient in the backward, instead of
several [N x V] fp32 tensors.

Cost: one more matmul than the naive path (the recomputation), the price of not storing
[N x V] anything; the three others are the same.

Precision. Logits are produced in the inputs' dtype (what ``hidden @ W.T`` gives a model);
softmax statistics and all accumulations across tiles (grad_hidden over vocabulary blocks,
grad_W over token chunks) are fp32.

Backends: per chunk or tile, ``triton`` (CUDA) runs the kernels of ``token_logprobs`` on
the logits buffer (the backward kernel overwrites it with dlogits in place); ``torch``
(CPU) runs the same math with in-place torch ops. ``backend="auto"`` chooses by device.

ZeRO-3: a partitioned weight is gathered around the autograd call, again inside the
backward, and held until its gradient is accumulated (see ``zero3.py``).
"""
from __future__ import annotations

import torch

from . import token_logprobs as _rows
from .token_logprobs import chunk_grad_logits_, chunk_logprobs_, resolve_backend, rows_per_chunk
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
    """hidden [n, H] (valid tokens only), weight [V, H], targets [n] -> (logprobs [n], lse [n]), fp32."""
    n, vocab_size = hidden.shape[0], weight.shape[0]
    stats_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logprobs = hidden.new_empty(n, dtype=stats_dtype)
    lse = hidden.new_empty(n, dtype=stats_dtype)
    if n == 0:
        return logprobs, lse
    chunk_tokens = min(chunk_tokens, n)
    scratch = _Scratch(hidden, chunk_tokens * vocab_size, backend)
    all_rows = torch.arange(chunk_tokens, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        logits = scratch.project(hidden[start:end], weight)
        if backend == "triton":
            _rows.triton_forward_rows(logits, targets[start:end], all_rows[: end - start],
                                      logprobs[start:end], lse[start:end], inv_temperature)
        else:
            chunk_lp, chunk_lse = chunk_logprobs_(scratch.compute_view(logits), targets[start:end], inv_temperature)
            logprobs[start:end] = chunk_lp
            lse[start:end] = chunk_lse
    return logprobs, lse


def _backward_tile_shape(n: int, vocab_size: int, chunk_tokens: int | None) -> tuple[int, int]:
    """(tokens, vocabulary columns) of a backward tile of about TORCH_CHUNK_BYTES in fp32."""
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
    tile_tokens, tile_vocab = _backward_tile_shape(n, vocab_size, chunk_tokens)
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
    def forward(ctx, hidden, weight, targets, ignore_index, inv_temperature, backend, chunk_tokens):
        rows = (targets != ignore_index).nonzero().squeeze(1)
        # Compact to the valid tokens once: [n, H] is small next to any [n, V] buffer.
        hidden_valid = hidden.index_select(0, rows)
        targets_valid = targets.index_select(0, rows)
        with gathered_weight(weight):
            forward_rows = chunk_tokens or rows_per_chunk(weight.shape[0], 4)
            logprobs_valid, lse = _forward_chunks(
                hidden_valid, weight, targets_valid, inv_temperature, backend, forward_rows
            )
        logprobs = logprobs_valid.new_zeros(targets.shape[0])
        logprobs[rows] = logprobs_valid
        ctx.save_for_backward(hidden_valid, targets_valid, rows, lse)
        # The weight is kept as the Parameter object, not via save_for_backward: under
        # ZeRO-3 its .data is swapped for an empty shard after the forward and must be
        # gathered again (through its ds_* attributes) in the backward.
        ctx.weight = weight
        ctx.hidden_shape = hidden.shape
        ctx.inv_temperature, ctx.backend, ctx.chunk_tokens = inv_temperature, backend, chunk_tokens
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden_valid, targets_valid, rows, lse = ctx.saved_tensors
        needs_grad_hidden, needs_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
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
        return grad_hidden, grad_weight, None, None, None, None, None


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
            sizes both to ``token_logprobs.TORCH_CHUNK_BYTES`` (256 MiB) of fp32.
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
    with gathered_weight(lm_head_weight) as weight:
        logprobs = FusedLinearTokenLogprobsFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            ignore_index,
            1.0 / temperature,
            backend,
            chunk_tokens,
        )
    return logprobs.view(targets.shape)
