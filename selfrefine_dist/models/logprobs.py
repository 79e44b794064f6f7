"""Per-token log-probabilities of a causal LM on given targets.

The one place where the learners (SFT and DPO) turn a batch into
log p(token_t | tokens_<t), so a faster path changes every learner at once.

Fused path (the default where it is exact): the model runs as usual (through its
wrapper: DeepSpeed engine, peft), but with ``logits_to_keep=1``, so its head projects one
position per sequence; a forward hook on the decoder keeps the final hidden states, and
``fused_linear_token_logprobs`` projects them onto the lm_head weight chunk by chunk. The
[tokens x vocab] logits never exist, in the forward or the backward. Under ZeRO-3 the
partitioned (possibly tied) head weight is gathered by the kernel (``kernels/zero3.py``).

Logits path (the fallback): the full logits, then cross_entropy. Taken for models whose
logits are not exactly ``last_hidden_state @ lm_head.weight.T`` (see ``_fused_head``).
"""
from __future__ import annotations

import inspect

import torch

IGNORE_INDEX = -100

# Model types whose causal-LM head is exactly ``logits = lm_head(final_norm(h))``: a bias-free
# Linear, no logit soft-capping (Gemma 2/3), no logit scale (Cohere, Granite, MiniCPM), no
# final multiplier. Other architectures take the logits path: a fused head that skipped
# their extra step would return wrong log-probs silently. Extend after checking the
# model's forward (and add it to tests/models/test_logprobs.py).
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"})


def causal_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[:, t+1] | input_ids[:, :t+1]) for each position t.

    model: a transformers causal LM, or a DeepSpeed engine / peft model wrapping one.
    input_ids, attention_mask, labels: [batch, seq_len]; labels -100 where no loss.
    Returns [batch, seq_len - 1] float32, 0 where the target is ignored.
    """
    targets = labels[:, 1:]
    head = _fused_head(model)
    if head is None:
        return _logits_path_logprobs(model, input_ids, attention_mask, targets)

    from selfrefine_dist.kernels import fused_linear_token_logprobs

    decoder, lm_head = head
    captured = []
    # output[0] is last_hidden_state for a ModelOutput and for a tuple alike. Hooking the
    # decoder rather than calling it directly keeps the wrapper's own forward in the loop
    # (DeepSpeed's ZeRO-3 step bookkeeping and external-parameter tracking, peft's hooks).
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        # logits_to_keep=1: the model's own head projects only the last position ([batch, 1, vocab]).
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[0][:, :-1]
    weight = lm_head.weight
    # nn.Linear would refuse mismatched dtypes too; under autocast it would run in the weight's.
    logprobs = fused_linear_token_logprobs(hidden.to(weight.dtype), weight, targets, ignore_index=IGNORE_INDEX)
    return logprobs


def _logits_path_logprobs(model, input_ids, attention_mask, targets):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    # cross_entropy runs log-softmax in fp32 without keeping a second [tokens x vocab] copy
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), safe_targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return -nll * mask


def _unwrap(model):
    """The transformers model inside a DeepSpeed engine / DDP (``.module``) and/or a peft model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected into the base model in place
        model = model.get_base_model()
    return model


def _fused_head(model):
    """(decoder module, lm_head Linear) when the fused path is exact for ``model``, else None."""
    causal_lm = _unwrap(model)
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None  # unknown head: it may soft-cap or scale its logits
    if not (hasattr(causal_lm, "get_output_embeddings") and hasattr(causal_lm, "get_decoder")):
        return None
    lm_head = causal_lm.get_output_embeddings()
    # A LoRA-adapted or modules_to_save head is a wrapper, not an nn.Linear: its output is not
    # hidden @ weight.T alone. Our kernel has no bias (Llama-family heads have none).
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        return None
    if "logits_to_keep" not in inspect.signature(causal_lm.forward).parameters:
        return None  # the model would project every position anyway
    return causal_lm.get_decoder(), lm_head
