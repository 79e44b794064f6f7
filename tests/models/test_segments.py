"""Per-segment attention (models/segments.py) against dense SDPA over the same block-diagonal mask:
the same hidden states and the same parameter gradients."""
import pytest
import torch

from selfrefine_dist.models.loading import load_causal_lm
from selfrefine_dist.models.segments import NAME, enable_segment_attention
from selfrefine_dist.refine.preference_data import collate_packed_pairs
from selfrefine_dist.refine.records import PreferenceExample

PAIRS = [PreferenceExample("a", (5, 9, 14, 3), (11, 12, 13), (21, 22)),
         PreferenceExample("b", (7, 2), (41, 42, 43, 44, 45), (51,)),
         PreferenceExample("c", (8,), (61,), (71, 72, 73))]


def hidden_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, **kwargs).last_hidden_state
    (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_segments_equal_dense_sdpa_forward_and_backward(tiny_model_dir):
    dense = load_causal_lm(str(tiny_model_dir), "fp32")
    segmented = load_causal_lm(str(tiny_model_dir), "fp32")
    assert dense.config._attn_implementation == "sdpa"
    assert enable_segment_attention(segmented) and segmented.config._attn_implementation == NAME
    batch = collate_packed_pairs(PAIRS, pad_token_id=0, one_row=True)
    assert len(batch.segments) == 3
    want_hidden, want_grads = hidden_and_grads(dense, batch)
    got_hidden, got_grads = hidden_and_grads(segmented, batch, segments=batch.segments)
    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # and each pair's states equal those of the pair alone, in a row of its own
    for pair, (start, end) in zip(PAIRS, batch.segments):
        alone = collate_packed_pairs([pair], pad_token_id=0)
        with torch.no_grad():
            states = dense.model(input_ids=alone.input_ids, attention_mask=alone.attention_mask,
                                 position_ids=alone.position_ids).last_hidden_state
        torch.testing.assert_close(got_hidden[:, start:end], states, rtol=1e-5, atol=1e-5)


def test_segments_attend_only_within_their_spans(tiny_model_dir):
    """The segment path reads only the mask's diagonal blocks: with off-block entries opened, dense SDPA
    changes, the segment path does not (so it is the path that ran)."""
    model = load_causal_lm(str(tiny_model_dir), "fp32").eval()
    enable_segment_attention(model)
    batch = collate_packed_pairs(PAIRS, pad_token_id=0, one_row=True)
    leaky = batch.attention_mask.clone()
    second = batch.segments[1][0]
    leaky[0, 0, second:, :second] = True  # let the later pairs see the first
    with torch.no_grad():
        run = lambda mask, **kw: model.model(input_ids=batch.input_ids, attention_mask=mask,  # noqa: E731
                                             position_ids=batch.position_ids, **kw).last_hidden_state
        clean = run(batch.attention_mask, segments=batch.segments)
        assert torch.equal(run(leaky, segments=batch.segments), clean)
        assert not torch.allclose(run(leaky), clean, atol=1e-4)  # no segments: dense SDPA over the mask


def test_bad_segments_are_refused(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), "fp32").eval()
    enable_segment_attention(model)
    batch = collate_packed_pairs(PAIRS, pad_token_id=0, one_row=True)
    with torch.no_grad(), pytest.raises(ValueError, match="one-row batch with a 4D mask covering them"):
        model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, segments=((0, 9), (9, 12)))


def test_other_attention_kinds_are_left_alone(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), "fp32")
    model.set_attn_implementation("eager")
    assert not enable_segment_attention(model) and model.config._attn_implementation == "eager"
