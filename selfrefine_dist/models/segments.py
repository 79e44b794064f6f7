"""Attention over a packed row, one segment at a time ("sdpa_segments").

A packed row holds several independent sequences (segments) side by side: the pairs of a DPO
micro-batch, the sequences of a reference pass. Its 4D mask is block-diagonal, so every linear layer
runs once over all of the row's tokens (one [tokens x hidden] matmul with many rows: on a CPU a 640-row
matmul runs ~1.25x the rate of a 160-row one) while attention must not mix segments. Dense SDPA over
the row would compute every off-diagonal block only to mask it out: the score work of a row of k
equal segments is k times that of the segments alone.

"sdpa_segments" is SDPA run on each segment's diagonal block of q, k, v and the mask, told where the
segments are by the model call's ``segments`` keyword ((start, end) spans covering a one-row batch).
Without ``segments`` it is SDPA itself. The row's full mask stays the source of truth: a model under
any other attention (plain "sdpa", "eager") ignores ``segments`` and computes the same values densely.

    enable_segment_attention(model)                  # "sdpa" -> "sdpa_segments"; other kinds untouched
    model(input_ids=row, attention_mask=mask_4d, position_ids=pos, segments=((0, 196), (196, 353)))
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

NAME = "sdpa_segments"
Spans = Tuple[Tuple[int, int], ...]


def segment_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], segments: Optional[Sequence[Tuple[int, int]]] = None,
                 **kwargs):
    """transformers' attention interface: query [1, heads, L, d], key/value [1, kv_heads, L, d],
    attention_mask [1, 1, L, L] bool (True: may attend) -> ([1, L, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not segments:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or attention_mask is None or segments[-1][1] != query.shape[2]:
        raise ValueError(f"segments {tuple(segments)[:3]}... need a one-row batch with a 4D mask covering them "
                         f"(query {tuple(query.shape)})")
    outputs = []
    for start, end in segments:
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], attention_mask[:, :, start:end, start:end], **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def register() -> None:
    """Make "sdpa_segments" known to transformers (idempotent): the attention above, SDPA's masks."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, segment_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def enable_segment_attention(model) -> bool:
    """Switch a transformers model under "sdpa" to "sdpa_segments"; returns whether it runs it now."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == "sdpa" and hasattr(model, "set_attn_implementation"):
        register()
        model.set_attn_implementation(NAME)
    return getattr(config, "_attn_implementation", None) == NAME


def segment_spans(lengths: Sequence[int]) -> Spans:
    """(start, end) of consecutive segments of the given lengths."""
    spans, start = [], 0
    for n in lengths:
        spans.append((start, start + n))
        start += n
    return tuple(spans)
