"""rms_norm and silu_mul against the Hugging Face ops they stand in for (LlamaRMSNorm; F.silu(gate) * up
under autograd): equal forward values, gradients equal up to rounding (fp32, bf16), fp64 gradchecks,
and fewer tensors kept for the backward."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from selfrefine_dist.kernels.decoder_ops import rms_norm, silu_mul
from selfrefine_dist.models import lean_activations


def saved_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for the backward of ``fn(*inputs)``, the inputs themselves left out."""
    return lean_activations.saved_bytes(lambda: fn(*inputs), exclude=inputs)


def norm_inputs(dtype, shape=(2, 13, 48), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype).requires_grad_()
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype).requires_grad_()
    grad = torch.randn(*shape, generator=gen).to(dtype)
    return x, weight, grad


def hf_norm(x, weight, eps=1e-5):
    module = LlamaRMSNorm(x.shape[-1], eps).to(x.dtype)
    module.weight = torch.nn.Parameter(weight.detach().clone())
    return module


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_llama_rms_norm(dtype, tol):
    x, weight, grad = norm_inputs(dtype)
    module = hf_norm(x, weight)
    want = module(x)
    want_x, want_w = torch.autograd.grad(want, (x, module.weight), grad)
    got = rms_norm(x, weight, 1e-5)
    got_x, got_w = torch.autograd.grad(got, (x, weight), grad)
    assert got.dtype == want.dtype and torch.equal(got, want)  # the same ops in the same order
    torch.testing.assert_close(got_x, want_x, atol=tol, rtol=tol)
    # bf16: autograd sums the weight's gradient over tokens in bf16, ours in fp32
    torch.testing.assert_close(got_w.float(), want_w.float(), atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_mul_matches_autograd(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    gate, up, grad = (torch.randn(2, 11, 40, generator=gen).mul(3).to(dtype) for _ in range(3))
    gate.requires_grad_(), up.requires_grad_()
    want = torch.nn.functional.silu(gate) * up
    want_grads = torch.autograd.grad(want, (gate, up), grad)
    got = silu_mul(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), grad)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_gradcheck_fp64():
    x, weight, _ = norm_inputs(torch.float64, shape=(3, 7))
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-6), (x, weight))
    gen = torch.Generator().manual_seed(2)
    gate = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))


def test_frozen_weight_and_partial_gradients():
    """A frozen norm weight (LoRA) gets no gradient and the input's is unchanged; likewise one MLP input."""
    x, weight, grad = norm_inputs(torch.float32)
    (full,) = torch.autograd.grad(rms_norm(x, weight, 1e-5), x, grad)
    frozen = weight.detach()
    out = rms_norm(x, frozen, 1e-5)
    (only_x,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(only_x, full, atol=0, rtol=0)
    gate = torch.randn(3, 5, requires_grad=True)
    up = torch.randn(3, 5)
    (grad_gate,) = torch.autograd.grad(silu_mul(gate, up), gate, torch.ones(3, 5))
    torch.testing.assert_close(grad_gate, torch.ops.aten.silu_backward(up, gate.detach()))


def test_they_keep_less_for_the_backward():
    x, weight, _ = norm_inputs(torch.float32, shape=(1, 64, 48))
    ours, theirs = saved_bytes(lambda a, w: rms_norm(a, w, 1e-5), x, weight), saved_bytes(hf_norm(x, weight), x)
    # autograd keeps x * rstd [64 x 48] (and rstd); ours keeps only rstd [64 x 1] besides the input
    assert ours == 64 * 4 and theirs >= 64 * 48 * 4 + 64 * 4
    gate = torch.randn(64, 96, requires_grad=True)
    up = torch.randn(64, 96, requires_grad=True)
    assert saved_bytes(silu_mul, gate, up) == 0  # gate and up themselves
    assert saved_bytes(lambda g, u: torch.nn.functional.silu(g) * u, gate, up) == 64 * 96 * 4  # + silu(gate)
