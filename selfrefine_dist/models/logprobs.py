"""Per-token log-probabilities of a causal LM on given targets.

The one place where the learners (SFT and DPO) turn a batch into
log p(token_t | tokens_<t), so a faster path changes every learner at once.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def causal_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[:, t+1] | input_ids[:, :t+1]) for each position t.

    input_ids, attention_mask, labels: [batch, seq_len]; labels -100 where no loss.
    Returns [batch, seq_len - 1] float32, 0 where the target is ignored.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    # cross_entropy runs log-softmax in fp32 without keeping a second [tokens x vocab] copy
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), safe_targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return -nll * mask
