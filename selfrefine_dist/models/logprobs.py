"""Per-token log-probabilities of a causal LM on given targets.

The one place where the learners (SFT and DPO) turn a batch into
log p(token_t | tokens_<t), so a faster path changes every learner at once.

Fused path (the default where it is exact): the model runs as usual (through its
wrapper: DeepSpeed engine, peft), but with ``logits_to_keep`` an empty index tensor, so its
head projects no position; a forward hook on the decoder keeps the final hidden states, and
``fused_linear_token_logprobs`` projects them onto the lm_head weight chunk by chunk. The
[tokens x vocab] logits never exist, in the forward or the backward. Under ZeRO-3 the
partitioned (possibly tied) head weight is gathered by the kernel (``kernels/zero3.py``).

``causal_hidden_states`` / ``decoder_hidden_states`` return those hidden states and the head
weight for callers that project them themselves: the DPO learners' ``fused_linear_preference_loss``,
on packed prompt + chosen + rejected rows (``refine/preference_data.collate_packed_pairs``).

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
    fused = causal_hidden_states(model, input_ids, attention_mask)
    if fused is None:
        return _logits_path_logprobs(model, input_ids, attention_mask, targets)

    from selfrefine_dist.kernels import fused_linear_token_logprobs

    hidden, weight = fused
    return fused_linear_token_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX)


def causal_nll_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the labels (the SFT loss before normalisation), [] fp32.

    Fused path: ``fused_linear_nll_loss`` makes the gradients while each logits tile is at hand
    (three head matmuls per token instead of the four of log-probs then autograd).
    """
    fused = causal_hidden_states(model, input_ids, attention_mask)
    if fused is None:
        return -_logits_path_logprobs(model, input_ids, attention_mask, labels[:, 1:]).sum()

    from selfrefine_dist.kernels import fused_linear_nll_loss

    hidden, weight = fused
    return fused_linear_nll_loss(hidden, weight, labels[:, 1:], ignore_index=IGNORE_INDEX)


def causal_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(hidden [batch, seq_len - 1, H], lm_head weight [V, H]) for a fused head, or None.

    None when the model's logits are not exactly ``hidden @ weight.T`` (see ``_fused_head``);
    then only the logits path is exact. Position t of ``hidden`` predicts token t + 1.
    """
    out = decoder_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    if out is None:
        return None
    hidden, weight = out
    return hidden[:, :-1], weight


def decoder_hidden_states(model, **inputs):
    """(final hidden states [batch, seq_len, H] in the head's dtype, lm_head weight), or None.

    ``inputs`` go to the model as they are (input_ids, attention_mask 2D or a 4D boolean mask,
    position_ids). The model runs through its wrapper with ``logits_to_keep`` an empty index
    tensor: its own head projects no position, and the caller projects them chunk by chunk.
    (``logits_to_keep=1`` would cost a [1, H] x [H, V] product per sequence; on a CPU, for a
    frozen head, torch runs it as a batched matmul over a contiguous copy of the transposed
    weight: a third of a 135M reference model's forward.)
    """
    head = _fused_head(model)
    if head is None:
        return None
    decoder, lm_head = head
    captured = []
    # output[0] is last_hidden_state for a ModelOutput and for a tuple alike. Hooking the
    # decoder rather than calling it directly keeps the wrapper's own forward in the loop
    # (DeepSpeed's ZeRO-3 step bookkeeping and external-parameter tracking, peft's hooks).
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, use_cache=False, logits_to_keep=no_position)
    finally:
        hook.remove()
    weight = lm_head.weight
    # nn.Linear would refuse mismatched dtypes too; under autocast it would run in the weight's.
    return captured[0].to(weight.dtype), weight


def accepts_4d_masks(model) -> bool:
    """True when the fused path applies and the attention takes an arbitrary boolean 4D mask
    (SDPA, eager, SDPA per segment; flash-attention kernels take only padding masks)."""
    from selfrefine_dist.models.segments import NAME as SEGMENTS

    if _fused_head(model) is None:
        return False
    return getattr(_unwrap(model).config, "_attn_implementation", None) in ("sdpa", "eager", SEGMENTS)


def runs_segment_attention(model) -> bool:
    """True when the model (or the one a wrapper holds) runs ``models/segments.py``'s per-segment attention."""
    from selfrefine_dist.models.segments import NAME as SEGMENTS

    return accepts_4d_masks(model) and getattr(_unwrap(model).config, "_attn_implementation", None) == SEGMENTS


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
    keep = inspect.signature(causal_lm.forward).parameters.get("logits_to_keep")
    if keep is None or "Tensor" not in str(keep.annotation):
        return None  # the model would project every position anyway (or takes no index tensor)
    return causal_lm.get_decoder(), lm_head
