"""fused_linear_preference_loss against the unfused chain it replaces.

Reference: naive_linear_token_logprobs (hidden @ W.T, log_softmax, gather) -> summed response
log-probs -> dpo_loss, differentiated by autograd. Every loss type, RPO and length averaging
must give the same loss, sequence log-probs and gradients of the hidden states and of the
weight, in fp64 (tight) and fp32, with tiles smaller than a sequence, an empty response, a
frozen weight, and both backends (Triton under the interpreter on CPU).
"""
from __future__ import annotations

import pytest
import torch

from selfrefine_dist.kernels import fused_linear_preference_loss, naive_linear_token_logprobs
from selfrefine_dist.losses import dpo_loss

PAIRS, SEQ, HIDDEN, VOCAB = 3, 11, 16, 123


def make_batch(dtype, seed=0, empty_rejected=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * PAIRS, SEQ, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5 * 3).to(dtype)
    targets = torch.randint(0, VOCAB, (2 * PAIRS, SEQ), generator=gen)
    prompt = torch.randint(1, 5, (2 * PAIRS,), generator=gen)
    for row, n in enumerate(prompt.tolist()):
        targets[row, :n] = -100  # prompt
        targets[row, SEQ - row % 3:] = -100  # padding of different lengths
    if empty_rejected:
        targets[2 * PAIRS - 1] = -100  # a rejected response with no token at all
    ref = torch.randn(2 * PAIRS, generator=gen, dtype=torch.float64).to(torch.float32) * 5 - 20
    return hidden, weight, targets, ref


def pair_loss_for(targets, ref, loss_type, rpo_alpha, average):
    lengths = (targets != -100).sum(1)
    label_smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0

    def pair_loss(chosen, rejected):
        return dpo_loss(chosen, rejected, ref[:PAIRS].to(chosen.dtype), ref[PAIRS:].to(chosen.dtype), 0.1, loss_type,
                        label_smoothing, chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:],
                        average_log_prob=average, rpo_alpha=rpo_alpha).loss

    return pair_loss


def reference(hidden, weight, targets, pair_loss):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logps = naive_linear_token_logprobs(hidden, weight, targets).sum(-1)
    loss = pair_loss(logps[:PAIRS], logps[PAIRS:])
    (loss * 1.7).backward()  # an upstream factor, as DeepSpeed's loss scaling applies
    return loss.detach(), logps.detach(), hidden.grad, weight.grad


def ours(hidden, weight, targets, pair_loss, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss, logps = fused_linear_preference_loss(hidden, weight, targets, pair_loss, **kwargs)
    assert not logps.requires_grad
    (loss * 1.7).backward()
    return loss.detach(), logps, hidden.grad, weight.grad


def assert_all_close(got, want, atol, rtol):
    for name, a, b in zip(("loss", "sequence_logps", "grad_hidden", "grad_weight"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.to(b.dtype), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("rpo_alpha", [None, 0.5])
@pytest.mark.parametrize("average", [None, True])
def test_matches_autograd_of_the_unfused_loss_fp64(loss_type, rpo_alpha, average):
    hidden, weight, targets, ref = make_batch(torch.float64)
    pair_loss = pair_loss_for(targets, ref, loss_type, rpo_alpha, average)
    want = reference(hidden, weight, targets, pair_loss)
    got = ours(hidden, weight, targets, pair_loss, backend="torch", chunk_tokens=3)  # several tiles per sequence
    assert_all_close(got, want, atol=1e-10, rtol=1e-9)
    assert got[3].abs().max() > 1e-3 and got[2].abs().max() > 1e-3  # a real gradient was compared


@pytest.mark.parametrize("chunk_tokens", [12, 40])
def test_grouped_and_long_pairs_mixed(chunk_tokens):
    """Tiles that hold several pairs, next to pairs longer than a tile (the accumulator path)."""
    hidden, weight, targets, ref = make_batch(torch.float64, seed=9)
    pair_loss = pair_loss_for(targets, ref, "robust", 0.5, True)
    want = reference(hidden, weight, targets, pair_loss)
    assert_all_close(ours(hidden, weight, targets, pair_loss, backend="torch", chunk_tokens=chunk_tokens), want,
                     atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_fp32_both_backends(backend, chunk_tokens):
    hidden, weight, targets, ref = make_batch(torch.float32, seed=3)
    pair_loss = pair_loss_for(targets, ref, "sigmoid", 1.0, None)
    want = reference(hidden.double(), weight.double(), targets, pair_loss)
    got = ours(hidden, weight, targets, pair_loss, backend=backend, chunk_tokens=chunk_tokens)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_all_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [None, 12, 4])  # one tile (grad_W is its product); groups; long pairs
def test_bf16_close_to_the_reference_on_the_same_inputs(chunk_tokens):
    hidden, weight, targets, ref = make_batch(torch.bfloat16, seed=4)
    pair_loss = pair_loss_for(targets, ref, "sigmoid", None, None)
    want = reference(hidden.double(), weight.double(), targets, pair_loss)
    got = ours(hidden, weight, targets, pair_loss, backend="torch", chunk_tokens=chunk_tokens)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    # bf16 logits carry ~3 significant digits; the sums over a response amplify that.
    assert_all_close(got, want, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_upstream_with_a_tied_weight_and_retain_graph(dtype):
    """An upstream gradient of exactly 1 hands the forward's gradients on unscaled. With the weight
    also used elsewhere (tied embeddings), autograd sums both into the weight's gradient; the handed
    tensors must not be written into: a second backward of the same graph gives the same gradients."""
    hidden, weight, targets, ref = make_batch(dtype, seed=6)
    pair_loss = pair_loss_for(targets, ref, "sigmoid", 0.5, None)
    tokens = torch.tensor([[3, 7, 7, 50]])

    def grads(fused: bool, retain: bool):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        if fused:
            loss, _ = fused_linear_preference_loss(h, w, targets, pair_loss, backend="torch")
        else:
            logps = naive_linear_token_logprobs(h.double(), w.double(), targets).sum(-1)
            loss = pair_loss(logps[:PAIRS], logps[PAIRS:])
        total = loss + torch.nn.functional.embedding(tokens, w).double().sum() * 0.01  # the tied input embedding
        total.backward(retain_graph=retain)
        first = (h.grad.clone(), w.grad.clone())
        if retain:
            h.grad, w.grad = None, None
            total.backward()
            torch.testing.assert_close((h.grad, w.grad), first, atol=0, rtol=0)
        return first

    got, want = grads(True, True), grads(False, False)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), **tol)


def test_gradcheck_fp64():
    hidden, weight, targets, ref = make_batch(torch.float64, seed=5)
    hidden, weight = hidden[:, :6, :5].contiguous(), weight[:, :5].contiguous()
    targets = targets[:, :6].contiguous()
    pair_loss = pair_loss_for(targets, ref, "sigmoid", 0.5, None)

    def fn(h, w):
        return fused_linear_preference_loss(h, w, targets, pair_loss, backend="torch", chunk_tokens=2)[0]

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()))


def test_frozen_weight_gives_hidden_gradient_only():
    hidden, weight, targets, ref = make_batch(torch.float64, seed=6)
    pair_loss = pair_loss_for(targets, ref, "ipo", None, None)
    want = reference(hidden, weight, targets, pair_loss)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_preference_loss(h, weight, targets, pair_loss, backend="torch")  # weight: no grad
    (loss * 1.7).backward()
    torch.testing.assert_close(h.grad, want[2], atol=1e-10, rtol=1e-9)


def test_no_grad_computes_the_loss_only():
    hidden, weight, targets, ref = make_batch(torch.float64, seed=7)
    pair_loss = pair_loss_for(targets, ref, "hinge", None, None)
    want = reference(hidden, weight, targets, pair_loss)
    with torch.no_grad():
        loss, logps = fused_linear_preference_loss(hidden.requires_grad_(), weight.requires_grad_(), targets,
                                                   pair_loss, backend="torch")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, want[0], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(logps, want[1], atol=1e-10, rtol=1e-9)


def test_a_loss_coupling_pairs_is_refused():
    hidden, weight, targets, _ = make_batch(torch.float64, seed=8)

    def coupled(chosen, rejected):  # the derivative for pair i depends on pair j: not decomposable
        return torch.sigmoid(chosen.sum() - rejected.sum()) ** 2

    with pytest.raises(ValueError, match="not a sum of per-pair terms"):  # pairs in separate tiles
        fused_linear_preference_loss(hidden.requires_grad_(), weight.requires_grad_(), targets, coupled,
                                     backend="torch", chunk_tokens=3)


def test_bad_shapes_are_named():
    hidden, weight, targets, ref = make_batch(torch.float32)
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        fused_linear_preference_loss(hidden[:5], weight, targets[:5], lambda c, r: c.sum())
