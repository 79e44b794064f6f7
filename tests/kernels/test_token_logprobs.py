"""token_logprobs against the torch reference: values and gradients, both backends.

The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py).
Tolerances: fp32 atol 1e-5 against the reference run in fp64. Half-precision logits are
upcast exactly, so their log-probs must still match the reference on the same values to
1e-5; their gradients are rounded once to the logits' dtype, so they are compared with
the dtype's resolution.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from selfrefine_dist.kernels import naive_token_logprobs, token_logprobs

# The package re-exports the function under the module's name, so fetch the module itself.
token_logprobs_module = importlib.import_module("selfrefine_dist.kernels.token_logprobs")

BACKENDS = ["torch", "triton"]
GRAD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_inputs(shape, vocab, dtype, ignore_fraction=0.2, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignore_fraction] = -100
    return logits, targets


def values_and_grad(fn, logits, targets, upstream, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    logprobs = fn(logits, targets, **kwargs)
    (logprobs * upstream).sum().backward()
    return logprobs.detach(), logits.grad


def check_against_reference(logits, targets, backend, temperature=1.0, block_size=None):
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    ours, our_grad = values_and_grad(
        token_logprobs, logits, targets, upstream, temperature=temperature, backend=backend, block_size=block_size
    )
    # Reference in fp64 on the same (already rounded) values: the bound measures our error.
    ref, ref_grad = values_and_grad(naive_token_logprobs, logits.double(), targets, upstream.double(),
                                    temperature=temperature)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    assert our_grad.dtype == logits.dtype
    torch.testing.assert_close(our_grad.double(), ref_grad, atol=GRAD_ATOL[logits.dtype], rtol=0)
    ignored = targets == -100
    assert (ours[ignored] == 0).all() and (our_grad[ignored] == 0).all()
    return ours, our_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_odd_shape_matches_reference(backend, dtype, temperature):
    """3 x 47 tokens over a vocabulary of 123: nothing is a power of two."""
    logits, targets = make_inputs((3, 47), 123, dtype)
    # block 32 makes the Triton kernel loop over 4 vocabulary slices, the last one partial;
    # 10 rows per chunk makes the torch path run several chunks, the last one partial.
    check_against_reference(logits, targets, backend, temperature, block_size=32 if backend == "triton" else 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabularies(backend, vocab, dtype):
    """SmolLM2's and Qwen's vocabularies at a few tokens (the interpreter is slow)."""
    logits, targets = make_inputs((2, 3), vocab, dtype, ignore_fraction=0.0, scale=4.0)
    targets[1, 2] = vocab - 1  # the last column is reachable
    check_against_reference(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_positions_and_all_ignored(backend):
    logits, targets = make_inputs((4, 9), 50, torch.float32)
    targets[0] = -100
    targets[:, -1] = -100
    ours, grad = check_against_reference(logits, targets, backend)
    assert (ours[0] == 0).all() and (grad[0] == 0).all()

    all_ignored = torch.full((4, 9), -100)
    ours, grad = values_and_grad(token_logprobs, logits, all_ignored, torch.ones(4, 9), backend=backend)
    assert (ours == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, targets = make_inputs((5, 7), 31, torch.float32, ignore_fraction=0.0)
    targets[2, :3] = 0  # token 0 is the "ignored" id here
    ours = token_logprobs(logits, targets, ignore_index=0, backend=backend)
    ref = naive_token_logprobs(logits, targets, ignore_index=0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours[targets == 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_are_stable(backend):
    """Logits of +-1e4 overflow a naive exp; the online log-sum-exp must not."""
    logits = torch.tensor([[1e4, -1e4, 0.0, 9999.0], [-1e4, -1e4, -1e4, -1e4]])
    targets = torch.tensor([3, 2])
    ours = token_logprobs(logits, targets, backend=backend)
    torch.testing.assert_close(ours, naive_token_logprobs(logits, targets), atol=1e-5, rtol=0)
    assert torch.isfinite(ours).all()


def test_non_contiguous_logits():
    """A sliced [B, T-1, V] view (the usual shift) is handled without a wrong stride."""
    logits, targets = make_inputs((2, 6), 40, torch.float32, ignore_fraction=0.0)
    shifted = logits[:, :-1]
    for backend in BACKENDS:
        ours = token_logprobs(shifted, targets[:, 1:], backend=backend)
        torch.testing.assert_close(ours, naive_token_logprobs(shifted, targets[:, 1:]), atol=1e-5, rtol=0)


def test_torch_path_gradcheck_float64():
    logits, targets = make_inputs((2, 5), 7, torch.float64, ignore_fraction=0.3, scale=1.0)
    logits.requires_grad_()

    def fn(x):
        return token_logprobs(x, targets, temperature=0.8, backend="torch", block_size=3)

    assert fn(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    """On CPU tensors 'auto' must not launch Triton (no driver outside the interpreter)."""
    assert token_logprobs_module.resolve_backend(torch.zeros(1), "auto") == "torch"
    calls = []
    monkeypatch.setattr(token_logprobs_module, "triton_forward_rows", lambda *args: calls.append(args))
    logits, targets = make_inputs((2, 3), 11, torch.float32)
    token_logprobs(logits, targets)
    assert calls == []


def test_cpu_extra_memory_at_most_half_of_naive(monkeypatch):
    """Given logits [2048 x 32000] fp32, forward + backward: ours adds the logits gradient and
    a scratch chunk; log_softmax + gather adds its output, its gradient and the logits gradient.
    The chunk budget is shrunk to 8 MiB so that, as at real sizes, a chunk is small next to [N x V]."""
    from selfrefine_dist.benchmarks.logprobs import CpuPeakMemory

    monkeypatch.setattr(token_logprobs_module, "TORCH_CHUNK_BYTES", 8 * 1024**2)

    logits, targets = make_inputs((2048,), 32000, torch.float32, ignore_fraction=0.0)
    upstream = torch.randn(2048, generator=torch.Generator().manual_seed(1))

    def extra_peak(fn):
        x = logits.clone().requires_grad_()
        probe = CpuPeakMemory()
        probe.start()
        (fn(x, targets) * upstream).sum().backward()
        return probe.extra_peak()

    naive = extra_peak(naive_token_logprobs)
    ours = extra_peak(token_logprobs)
    assert naive > 2 * logits.numel() * 4 * 0.9, naive
    assert ours <= naive / 2, (ours, naive)


def test_rejects_bad_arguments():
    logits, targets = make_inputs((2, 3), 11, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(logits, targets[:, :2])
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(logits, targets, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_matches_reference_and_saves_memory(dtype):
    """Real kernels on a GPU: 512 tokens x 151936, and a peak well under the reference's."""
    logits, targets = make_inputs((4, 128), 151936, dtype, scale=4.0)
    logits, targets = logits.cuda(), targets.cuda()
    upstream = torch.randn(targets.shape, device="cuda")
    ours, our_grad = values_and_grad(token_logprobs, logits, targets, upstream)
    ref, ref_grad = values_and_grad(naive_token_logprobs, logits.float(), targets, upstream)
    torch.testing.assert_close(ours, ref, atol=1e-5 if dtype == torch.float32 else 1e-4, rtol=0)
    torch.testing.assert_close(our_grad.float(), ref_grad, atol=GRAD_ATOL[dtype], rtol=0)

    def extra_peak(fn):
        x = logits.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (fn(x, targets) * upstream).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert extra_peak(token_logprobs) <= 0.5 * extra_peak(naive_token_logprobs)
