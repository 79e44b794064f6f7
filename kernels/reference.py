"""Plain torch references for the log-prob kernels.

These are the definitions the kernels are tested and benchmarked against. They are
written for clarity, not memory: ``naive_token_logprobs`` materialises an fp32
[tokens x vocab] log-softmax, and ``naive_linear_token_logprobs`` also holds the full
logits. That is exactly the cost the fused kernels avoid.

    logp[n] = log_softmax(logits[n] / temperature)[targets[n]]     (0 where targets[n] == ignore_index)
"""
from __future__ import annotations

import torch


def naive_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log p(target): ``log_softmax(logits.float() / temperature).gather(targets)``.

    Args:
        logits: [..., V], any float dtype; upcast to fp32 (fp64 stays fp64).
        targets: [...] int64 token ids; ``ignore_index`` marks positions to skip.
    Returns:
        [...] fp32 (fp64 for fp64 logits) log-probs, 0 at ignored positions.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute_dtype)
    if temperature != 1.0:  # no extra [N x V] copy in the common case
        logits = logits / temperature
    logprobs_all = torch.log_softmax(logits, dim=-1)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    picked = logprobs_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def naive_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``naive_token_logprobs(hidden @ weight.T + bias, targets)``: the full-logits baseline.

    Args:
        hidden: [..., H] final hidden states.
        weight: [V, H] lm_head weight.
        bias: [V] or None.
        targets: [...] token ids.
    Returns:
        [...] fp32 log-probs.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return naive_token_logprobs(logits, targets, ignore_index, temperature)
