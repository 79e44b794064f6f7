"""Per-token log-probabilities of target tokens from logits, without an fp32 [N x V] log-softmax.

    lse[n]  = logsumexp_v(logits[n, v] / T)                  (online, over vocabulary blocks)
    logp[n] = logits[n, targets[n]] / T - lse[n]             (0 where targets[n] == ignore_index)

    d logp[n] / d logits[n, v] = (1[v == targets[n]] - softmax(logits[n] / T)[v]) / T

The backward writes ``grad_logp[n] * (onehot - softmax) / T`` row by row from the saved
``lse``; ignored rows get a zero gradient. Accumulation is fp32 for fp32/bf16/fp16 logits.

Two implementations share one ``torch.autograd.Function``:

* ``triton`` (CUDA, or any device under ``TRITON_INTERPRET=1``): one program per valid row
  streams the row in ``BLOCK_SIZE`` slices, keeping a running max and rescaled sum.
* ``torch`` (the CPU path): the same math on chunks of rows, each chunk copied into a
  preallocated fp32 scratch buffer, so the extra memory is a few chunks, not [N x V].

``backend="auto"`` picks Triton for CUDA tensors and torch otherwise. Triton is imported
guardedly: ``import selfrefine_dist.kernels`` works on machines without it.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch path below still works
    triton = None

# Bytes of one fp32 scratch buffer in the torch path: [rows x V] here (~220 rows at
# V=151936), a [tokens x vocabulary] tile in the fused linear path (4096 x 8192). 128 MiB
# keeps the fused path's extra memory at the weight gradient plus 1/4 GiB, and its tiles
# wide enough on both sides for the CPU GEMMs (on a 2-core AVX2 EPYC, 2048 x 8192 and
# 2048 x 16384 tiles ran at the same speed within the noise of a shared machine).
TORCH_CHUNK_BYTES = 128 * 1024**2


# ---------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _token_logprobs_fwd_kernel(
        logits_ptr,
        logits_row_stride,
        targets_ptr,
        rows_ptr,
        logprobs_ptr,
        lse_ptr,
        vocab_size,
        inv_temperature,
        BLOCK_SIZE: tl.constexpr,
    ):
        """Program i handles row rows[i]: online log-sum-exp over the row, then the target."""
        row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
        row_logits_ptr = logits_ptr + row * logits_row_stride
        running_max = float("-inf")
        running_sum = 0.0
        for block_start in range(0, vocab_size, BLOCK_SIZE):
            cols = block_start + tl.arange(0, BLOCK_SIZE)
            x = tl.load(row_logits_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
            x = x.to(tl.float32) * inv_temperature
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # Rescale the sum so far to the new max before adding this block.
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        log_sum = tl.log(running_sum)
        target = tl.load(targets_ptr + row).to(tl.int64)
        target_logit = tl.load(row_logits_ptr + target).to(tl.float32) * inv_temperature
        # (x_t - max) - log(sum) rather than x_t - lse: no cancellation between two large
        # numbers when the logits are large (the way log_softmax computes it).
        tl.store(logprobs_ptr + row, (target_logit - running_max) - log_sum)
        tl.store(lse_ptr + row, running_max + log_sum)

    @triton.jit
    def _token_logprobs_bwd_kernel(
        logits_ptr,
        logits_row_stride,
        grad_logits_ptr,
        grad_logits_row_stride,
        targets_ptr,
        rows_ptr,
        lse_ptr,
        grad_logprobs_ptr,
        n_cols,
        col_offset,
        inv_temperature,
        BLOCK_SIZE: tl.constexpr,
    ):
        """Program i writes grad_logits[rows[i]] = g * (onehot - exp(x / T - lse)) / T.

        The row may be a tile of the vocabulary: its n_cols columns are vocabulary ids
        col_offset + j. grad_logits may alias logits (the fused linear path does this):
        every slice is read before it is written, by the same program.
        """
        row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
        row_logits_ptr = logits_ptr + row * logits_row_stride
        row_grad_ptr = grad_logits_ptr + row * grad_logits_row_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        scale = tl.load(grad_logprobs_ptr + row).to(tl.float32) * inv_temperature
        for block_start in range(0, n_cols, BLOCK_SIZE):
            cols = block_start + tl.arange(0, BLOCK_SIZE)
            in_row = cols < n_cols
            x = tl.load(row_logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
            probs = tl.exp(x - lse)
            grad = scale * (tl.where(cols + col_offset == target, 1.0, 0.0) - probs)
            tl.store(row_grad_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _triton_block_size(vocab_size: int) -> int:
    # The interpreter runs each program as numpy: fewer, larger blocks are much faster.
    # On a GPU 8192 fp32 values per slice keeps registers in check at 8 warps.
    cap = 65536 if os.environ.get("TRITON_INTERPRET") == "1" else 8192
    return min(cap, triton.next_power_of_2(vocab_size))


def _check_triton() -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch' on CPU")


def triton_forward_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    logprobs: torch.Tensor,
    lse: torch.Tensor,
    inv_temperature: float,
    block_size: int | None = None,
) -> None:
    """Fill ``logprobs[rows]`` and ``lse[rows]`` (fp32 [N]) from ``logits`` [N, V] (row-major)."""
    _check_triton()
    if rows.numel() == 0:
        return
    block_size = block_size or _triton_block_size(logits.shape[1])
    _token_logprobs_fwd_kernel[(rows.numel(),)](
        logits, logits.stride(0), targets, rows, logprobs, lse,
        logits.shape[1], inv_temperature, BLOCK_SIZE=block_size, num_warps=8,
    )


def triton_backward_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_logits: torch.Tensor,
    inv_temperature: float,
    block_size: int | None = None,
    col_offset: int = 0,
) -> None:
    """Write ``grad_logits[rows]`` [*, W]; ``grad_logits`` may be ``logits`` itself (in place).

    ``logits`` [N, W] may hold vocabulary columns col_offset .. col_offset + W - 1 only.
    """
    _check_triton()
    if rows.numel() == 0:
        return
    block_size = block_size or _triton_block_size(logits.shape[1])
    _token_logprobs_bwd_kernel[(rows.numel(),)](
        logits, logits.stride(0), grad_logits, grad_logits.stride(0), targets, rows, lse,
        grad_logprobs.contiguous(), logits.shape[1], col_offset, inv_temperature,
        BLOCK_SIZE=block_size, num_warps=8,
    )


# ---------------------------------------------------------------------------------------
# Torch (CPU) chunk math. Both helpers work in place on an fp32 (or fp64) scratch chunk.


def chunk_logprobs_(scratch: torch.Tensor, targets: torch.Tensor, inv_temperature: float):
    """Log-probs of ``targets`` [C] from logits already copied into ``scratch`` [C, V].

    ``scratch`` is overwritten (it ends as exp(x - max)). Returns (logprobs [C], lse [C]).
    """
    if inv_temperature != 1.0:
        scratch.mul_(inv_temperature)
    target_logits = scratch.gather(1, targets.unsqueeze(1)).squeeze(1)
    row_max = scratch.amax(dim=1, keepdim=True)
    # In place instead of torch.logsumexp, which would allocate a second [C, V] buffer.
    log_sum = scratch.sub_(row_max).exp_().sum(dim=1).log_()
    row_max = row_max.squeeze(1)
    # (x_t - max) - log(sum): no cancellation between two large numbers, as in log_softmax.
    return (target_logits - row_max) - log_sum, row_max + log_sum


def chunk_grad_logits_(
    scratch: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logprobs: torch.Tensor,
    inv_temperature: float,
    col_offset: int = 0,
) -> torch.Tensor:
    """Turn logits in ``scratch`` [C, W] into g * (onehot - softmax(x / T)) / T, in place.

    ``scratch`` may be a vocabulary tile: column j is vocabulary id col_offset + j.
    """
    scale = grad_logprobs.to(scratch.dtype) * inv_temperature
    if inv_temperature != 1.0:
        scratch.mul_(inv_temperature)
    scratch.sub_(lse.to(scratch.dtype).unsqueeze(1)).exp_().mul_(scale.neg().unsqueeze(1))
    local_targets = targets - col_offset
    in_tile = ((local_targets >= 0) & (local_targets < scratch.shape[1])).nonzero().squeeze(1)
    scratch.index_put_((in_tile, local_targets[in_tile]), scale[in_tile], accumulate=True)
    return scratch


def rows_per_chunk(vocab_size: int, element_size: int = 4, budget_bytes: int | None = None) -> int:
    """How many [V] rows fit in one scratch buffer of ``budget_bytes``."""
    budget = TORCH_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (vocab_size * element_size))


def _load_rows(scratch: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy logits[rows] into the head of ``scratch`` (upcasting), return that view."""
    buf = scratch[: rows.numel()]
    if logits.dtype == scratch.dtype:  # straight into the scratch, no temporary
        torch.index_select(logits, 0, rows, out=buf)
    else:
        buf.copy_(logits.index_select(0, rows))
    return buf


def _torch_forward(logits, targets, rows, logprobs, lse, inv_temperature, chunk_rows):
    compute_dtype = logprobs.dtype
    chunk_rows = chunk_rows or rows_per_chunk(logits.shape[1], logprobs.element_size())
    scratch = logits.new_empty((min(chunk_rows, rows.numel()), logits.shape[1]), dtype=compute_dtype)
    for chunk in rows.split(chunk_rows):
        buf = _load_rows(scratch, logits, chunk)
        chunk_logprobs, chunk_lse = chunk_logprobs_(buf, targets[chunk], inv_temperature)
        logprobs[chunk] = chunk_logprobs
        lse[chunk] = chunk_lse


def _torch_backward(logits, targets, rows, lse, grad_logprobs, grad_logits, inv_temperature, chunk_rows):
    compute_dtype = lse.dtype
    chunk_rows = chunk_rows or rows_per_chunk(logits.shape[1], lse.element_size())
    scratch = logits.new_empty((min(chunk_rows, rows.numel()), logits.shape[1]), dtype=compute_dtype)
    for chunk in rows.split(chunk_rows):
        buf = _load_rows(scratch, logits, chunk)
        chunk_grad_logits_(buf, targets[chunk], lse[chunk], grad_logprobs[chunk], inv_temperature)
        grad_logits.index_copy_(0, chunk, buf.to(grad_logits.dtype))


# ---------------------------------------------------------------------------------------
# autograd


def resolve_backend(tensor: torch.Tensor, backend: str) -> str:
    """'auto' -> 'triton' for CUDA tensors (when triton imports), else 'torch'."""
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton is not None else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V], targets [N] -> logprobs [N] (fp32; fp64 for fp64 logits on the torch path)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inv_temperature, backend, block_size):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        rows = (targets != ignore_index).nonzero().squeeze(1)
        compute_dtype = torch.float64 if logits.dtype == torch.float64 and backend == "torch" else torch.float32
        logprobs = torch.zeros(targets.shape, dtype=compute_dtype, device=logits.device)
        lse = torch.zeros_like(logprobs)
        if backend == "triton":
            triton_forward_rows(logits, targets, rows, logprobs, lse, inv_temperature, block_size)
        else:
            _torch_forward(logits, targets, rows, logprobs, lse, inv_temperature, block_size)
        ctx.save_for_backward(logits, targets, rows, lse)
        ctx.inv_temperature, ctx.backend, ctx.block_size = inv_temperature, backend, block_size
        ctx.ignore_index = ignore_index
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        logits, targets, rows, lse = ctx.saved_tensors
        # Valid rows are all overwritten; only the ignored ones need zeros (no full memset).
        grad_logits = torch.empty_like(logits)
        grad_logits.index_fill_(0, (targets == ctx.ignore_index).nonzero().squeeze(1), 0)
        if ctx.backend == "triton":
            triton_backward_rows(
                logits, targets, rows, lse, grad_logprobs, grad_logits, ctx.inv_temperature, ctx.block_size
            )
        else:
            _torch_backward(
                logits, targets, rows, lse, grad_logprobs, grad_logits, ctx.inv_temperature, ctx.block_size
            )
        return grad_logits, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[targets], never holding an fp32 [N x V] tensor.

    Args:
        logits: [..., V] fp32, bf16 or fp16 (fp64 on the torch path, for gradcheck).
        targets: [...] int64 token ids; positions equal to ``ignore_index`` give 0 and no gradient.
        temperature: divides the logits before the softmax (> 0).
        backend: 'auto' (Triton on CUDA, torch chunks elsewhere), 'triton' or 'torch'.
        block_size: Triton: vocabulary slice per loop step (power of 2);
            torch: rows per scratch chunk. None picks a default.
    Returns:
        [...] fp32 log-probs (the same leading shape as ``targets``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    backend = resolve_backend(logits, backend)
    logprobs = TokenLogprobsFunction.apply(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index,
        1.0 / temperature,
        backend,
        block_size,
    )
    return logprobs.view(targets.shape)
