"""fused_linear_nll_loss against sum(w * -log_softmax(hidden @ W.T)[targets]) under autograd."""
from __future__ import annotations

import pytest
import torch

from selfrefine_dist.kernels import fused_linear_nll_loss, naive_linear_token_logprobs


def make_inputs(dtype, shape=(3, 47), hidden_size=16, vocab=123, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.3] = -100
    token_weights = torch.rand(shape, generator=gen) + 0.5
    return hidden, weight, targets, token_weights


def reference(hidden, weight, targets, token_weights):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = -(naive_linear_token_logprobs(hidden, weight, targets) * token_weights.to(hidden.dtype)).sum()
    (loss * 0.3).backward()  # an upstream factor, as the SFT loss scale
    return loss.detach(), hidden.grad, weight.grad


def ours(hidden, weight, targets, token_weights, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fused_linear_nll_loss(hidden, weight, targets, token_weights, **kwargs)
    (loss * 0.3).backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_all_close(got, want, atol, rtol):
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.to(b.dtype), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_fp64_matches_autograd(chunk_tokens):
    inputs = make_inputs(torch.float64)
    got = ours(*inputs, backend="torch", chunk_tokens=chunk_tokens)
    assert_all_close(got, reference(*inputs), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_both_backends_default_weights(backend):
    hidden, weight, targets, _ = make_inputs(torch.float32, seed=1)
    ones = torch.ones(targets.shape)
    got = ours(hidden, weight, targets, None, backend=backend, chunk_tokens=16)
    assert got[0].dtype == torch.float32
    assert_all_close(got, reference(hidden.double(), weight.double(), targets, ones), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("vocab", [49152, 151936])
def test_real_vocabulary_sizes(vocab):
    """Within 2e-5 of the exact (fp64) answer, or no worse than 1.5x the fp32 torch reference: a
    gradient summed over 151936 vocabulary terms in fp32 carries ~1e-5 error in any implementation."""
    inputs = make_inputs(torch.float32, shape=(2, 5), hidden_size=8, vocab=vocab, seed=2)
    exact = reference(inputs[0].double(), inputs[1].double(), inputs[2], inputs[3])
    fp32_reference = reference(*inputs)
    for got, want, ref32 in zip(ours(*inputs, backend="torch"), exact, fp32_reference):
        error = (got.double() - want).abs().max().item()
        assert error <= max(2e-5, 1.5 * (ref32.double() - want).abs().max().item()), error


def test_bf16_close_to_the_reference():
    inputs = make_inputs(torch.bfloat16, seed=3)
    want = reference(inputs[0].double(), inputs[1].double(), inputs[2], inputs[3])
    got = ours(*inputs, backend="torch")
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert_all_close(got, want, atol=0.1, rtol=0.05)


def test_gradcheck_fp64():
    hidden, weight, targets, token_weights = make_inputs(torch.float64, shape=(2, 5), hidden_size=4, vocab=11, seed=4)

    def fn(h, w):
        return fused_linear_nll_loss(h, w, targets, token_weights, backend="torch", chunk_tokens=3)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()))


def test_all_ignored_and_frozen_weight():
    hidden, weight, targets, token_weights = make_inputs(torch.float64, seed=5)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_nll_loss(h, weight, torch.full_like(targets, -100), token_weights)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any()
    want = reference(hidden, weight, targets, token_weights)
    h = hidden.clone().requires_grad_()
    (fused_linear_nll_loss(h, weight, targets, token_weights) * 0.3).backward()  # weight: no gradient
    torch.testing.assert_close(h.grad, want[1], atol=1e-10, rtol=1e-9)
