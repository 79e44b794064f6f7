"""fused_linear_token_logprobs against hidden @ W.T -> log_softmax -> gather.

Both backends run on CPU tensors (Triton under the interpreter). With fp32 inputs the
log-probs must be within 1e-5 of the exact (fp64) answer, and the gradients of the hidden
states and the weight within 1e-5 or no less accurate than the fp32 torch reference.
bf16 inputs are compared with the reference on the same rounded inputs: their logits
are rounded to bf16 like the model's own ``hidden @ W.T`` would be, hence looser bounds.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from selfrefine_dist.kernels import fused_linear_token_logprobs, naive_linear_token_logprobs, naive_token_logprobs
from selfrefine_dist.kernels import fused_linear_logprobs as fused_module

token_logprobs_module = importlib.import_module("selfrefine_dist.kernels.token_logprobs")

BACKENDS = ["torch", "triton"]


def make_inputs(tokens_shape, hidden_size, vocab, dtype, ignore_fraction=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens_shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, tokens_shape, generator=gen)
    targets[torch.rand(tokens_shape, generator=gen) < ignore_fraction] = -100
    return hidden, weight, targets


def run(fn, hidden, weight, targets, upstream, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs = fn(hidden, weight, targets, **kwargs)
    (logprobs * upstream).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad


def assert_close_to_exact(ours, exact, fp32_reference, atol):
    """max |ours - exact| <= atol, or at most 1.5x the fp32 torch reference's own error.

    The second clause covers fp32's floor: a gradient summed over 151936 vocabulary terms
    by an fp32 GEMM carries ~1e-5 error in any implementation, the reference's included.
    """
    error = (ours.double() - exact).abs().max().item()
    reference_error = (fp32_reference.double() - exact).abs().max().item()
    assert error <= max(atol, 1.5 * reference_error), (error, reference_error)


def check(hidden, weight, targets, backend, temperature=1.0, chunk_tokens=None, tolerances=None):
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    ours = run(fused_linear_token_logprobs, hidden, weight, targets, upstream,
               temperature=temperature, backend=backend, chunk_tokens=chunk_tokens)
    # The exact answer (fp64) on the same, possibly rounded, inputs; and the fp32 reference.
    exact = run(naive_linear_token_logprobs, hidden.double(), weight.double(), targets, upstream.double(),
                temperature=temperature)
    ref32 = run(naive_linear_token_logprobs, hidden.float(), weight.float(), targets, upstream, temperature=temperature)
    assert ours[0].dtype == torch.float32 and ours[0].shape == targets.shape
    assert ours[1].dtype == hidden.dtype and ours[2].dtype == weight.dtype
    if tolerances is None:  # fp32 inputs
        torch.testing.assert_close(ours[0].double(), exact[0], atol=1e-5, rtol=0)
        assert_close_to_exact(ours[1], exact[1], ref32[1], atol=1e-5)
        assert_close_to_exact(ours[2], exact[2], ref32[2], atol=1e-5)
    else:
        for our_tensor, exact_tensor, atol in zip(ours, exact, tolerances):
            torch.testing.assert_close(our_tensor.double(), exact_tensor, atol=atol, rtol=0)
    ignored = targets == -100
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_odd_shape_fp32(backend, temperature, chunk_tokens):
    """3 x 47 tokens, hidden 24, vocabulary 123; 16 tokens per chunk leaves a partial last chunk."""
    hidden, weight, targets = make_inputs((3, 47), 24, 123, torch.float32)
    check(hidden, weight, targets, backend, temperature, chunk_tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shape_bf16(backend):
    """bf16: logits are rounded to bf16 (as the model's head would), statistics stay fp32."""
    hidden, weight, targets = make_inputs((3, 47), 24, 123, torch.bfloat16)
    # bf16 logits of magnitude ~10 carry ~0.03 rounding error; gradients likewise.
    check(hidden, weight, targets, backend, chunk_tokens=16, tolerances=(0.1, 0.05, 0.1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_backward(monkeypatch, backend, dtype):
    """A tiny byte budget: 5-token forward chunks; backward tiles of 16 tokens x 40
    vocabulary columns (blocks 40, 40, 40, 3), so the offsets of vocabulary tiles, partial
    tiles on both sides and the fp32 accumulation across them are all exercised."""
    monkeypatch.setattr(fused_module, "_MIN_VOCAB_BLOCK", 40)
    monkeypatch.setattr(token_logprobs_module, "TORCH_CHUNK_BYTES", 16 * 40 * 4)
    assert fused_module._tile_shape(113, 123, None) == (16, 40)
    hidden, weight, targets = make_inputs((3, 47), 24, 123, dtype)
    check(hidden, weight, targets, backend, temperature=0.9,
          tolerances=None if dtype == torch.float32 else (0.1, 0.05, 0.1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [49152, 151936])
def test_large_vocabularies(backend, vocab):
    hidden, weight, targets = make_inputs((2, 3), 32, vocab, torch.float32, ignore_fraction=0.0)
    targets[0, 0] = vocab - 1
    check(hidden, weight, targets, backend, chunk_tokens=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_still_returns_full_weight_gradient(backend):
    """A rank without valid tokens must still return a [V, H] zero gradient (ZeRO reduces it)."""
    hidden, weight, targets = make_inputs((2, 5), 8, 13, torch.float32)
    targets[:] = -100
    logprobs, grad_hidden, grad_weight = run(fused_linear_token_logprobs, hidden, weight, targets,
                                             torch.ones(2, 5), backend=backend)
    assert (logprobs == 0).all() and (grad_hidden == 0).all()
    assert grad_weight is not None and grad_weight.shape == weight.shape and (grad_weight == 0).all()


def test_frozen_weight_and_no_grad():
    hidden, weight, targets = make_inputs((2, 6), 8, 21, torch.float32)
    # A frozen head (reference model): only the hidden states get a gradient.
    hidden_leaf = hidden.clone().requires_grad_()
    fused_linear_token_logprobs(hidden_leaf, weight, targets).sum().backward()
    expected = hidden.clone().requires_grad_()
    naive_linear_token_logprobs(expected, weight, targets).sum().backward()
    torch.testing.assert_close(hidden_leaf.grad, expected.grad, atol=1e-5, rtol=0)
    # Reference log-probs under no_grad.
    with torch.no_grad():
        logprobs = fused_linear_token_logprobs(hidden, weight, targets)
    assert not logprobs.requires_grad
    torch.testing.assert_close(logprobs, naive_linear_token_logprobs(hidden, weight, targets), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiny_tiles", [False, True])
def test_frozen_head(monkeypatch, backend, dtype, tiny_tiles):
    """A frozen head (LoRA, reference model with grad): E = softmax @ W is accumulated in the
    forward, online across vocabulary tiles, and the backward is elementwise. Values and
    hidden-state gradients as with a trainable head; the weight gets no gradient."""
    if tiny_tiles:  # 16 x 40 tiles: the online rescaling of E across 4 vocabulary blocks
        monkeypatch.setattr(fused_module, "_MIN_VOCAB_BLOCK", 40)
        monkeypatch.setattr(token_logprobs_module, "TORCH_CHUNK_BYTES", 16 * 40 * 4)
    hidden, weight, targets = make_inputs((3, 47), 24, 123, dtype)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    h = hidden.clone().requires_grad_()
    logprobs = fused_linear_token_logprobs(h, weight, targets, temperature=0.8, backend=backend)
    (logprobs * upstream).sum().backward()
    exact_h = hidden.double().requires_grad_()
    exact = naive_linear_token_logprobs(exact_h, weight.double(), targets, temperature=0.8)
    (exact * upstream.double()).sum().backward()
    atol = (1e-5, 1e-5) if dtype == torch.float32 else (0.1, 0.05)
    assert logprobs.dtype == torch.float32 and h.grad.dtype == dtype and weight.grad is None
    torch.testing.assert_close(logprobs.detach().double(), exact.detach(), atol=atol[0], rtol=0)
    torch.testing.assert_close(h.grad.double(), exact_h.grad, atol=atol[1], rtol=0)
    assert (h.grad[targets == -100] == 0).all()


def test_gradcheck_float64_frozen_head():
    hidden, weight, targets = make_inputs((2, 5), 6, 11, torch.float64, ignore_fraction=0.3)
    hidden.requires_grad_()

    def fn(h):
        return fused_linear_token_logprobs(h, weight, targets, temperature=1.3, backend="torch", chunk_tokens=3)

    assert torch.autograd.gradcheck(fn, (hidden,), eps=1e-6, atol=1e-7)


def test_gradcheck_float64():
    hidden, weight, targets = make_inputs((2, 5), 6, 11, torch.float64, ignore_fraction=0.3)
    hidden.requires_grad_()
    weight.requires_grad_()

    def fn(h, w):
        return fused_linear_token_logprobs(h, w, targets, temperature=1.3, backend="torch", chunk_tokens=3)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7)


def test_half_weight_gradient_accumulates_in_fp32(monkeypatch):
    """64 one-token tiles add into a bf16 weight's gradient. One large contribution first,
    then 63 small ones: a bf16 running sum (ulp 2 at 256) would drop every small one (~25%
    of the total); accumulating in fp32 keeps the result within bf16 rounding of fp32.
    """
    # Backward tiles of 1 token x 16 vocabulary columns: 64 token chunks per vocabulary block.
    monkeypatch.setattr(fused_module, "_MIN_VOCAB_BLOCK", 16)
    monkeypatch.setattr(token_logprobs_module, "TORCH_CHUNK_BYTES", 16 * 4)
    hidden = torch.ones(64, 16, dtype=torch.bfloat16)
    weight = (torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 0.01).to(torch.bfloat16)
    targets = torch.full((64,), 7)
    upstream = torch.ones(64)
    upstream[0] = 256.0
    _, _, grad_weight = run(fused_linear_token_logprobs, hidden, weight, targets, upstream,
                            backend="torch", chunk_tokens=1)
    _, _, ref_grad_weight = run(naive_linear_token_logprobs, hidden.float(), weight.float(), targets, upstream)
    torch.testing.assert_close(grad_weight[7].float(), ref_grad_weight[7], rtol=1e-2, atol=0)
    torch.testing.assert_close(grad_weight.float(), ref_grad_weight, rtol=2e-2, atol=1e-3)


def test_tiny_llama_with_tied_embeddings():
    """The way a learner uses it: backbone hidden states + the tied lm_head weight (SmolLM2)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids = torch.randint(0, 97, (2, 12))
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt

    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    logps = fused_linear_token_logprobs(hidden, model.lm_head.weight, labels[:, 1:])
    logps.sum().backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=input_ids).logits[:, :-1]
    ref = naive_token_logprobs(logits, labels[:, 1:])
    ref.sum().backward()
    torch.testing.assert_close(logps.detach(), ref.detach(), atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cpu_extra_memory_is_a_small_fraction_of_naive(monkeypatch):
    """The CPU path never holds [N x V]: 2048 tokens x 32000 vocabulary, forward + backward.

    With an 8 MiB chunk budget our extra peak RSS is the weight gradient plus one tile
    (~20 MB); the naive path holds several [2048 x 32000] fp32 tensors (262 MB each).
    """
    from selfrefine_dist.benchmarks.logprobs import CpuPeakMemory

    monkeypatch.setattr(token_logprobs_module, "TORCH_CHUNK_BYTES", 8 * 1024**2)
    hidden, weight, targets = make_inputs((2048,), 64, 32000, torch.float32, ignore_fraction=0.0)
    upstream = torch.randn(2048, generator=torch.Generator().manual_seed(1))

    def extra_peak(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        probe = CpuPeakMemory()
        probe.start()
        (fn(h, w, targets) * upstream).sum().backward()
        return probe.extra_peak()

    naive = extra_peak(naive_linear_token_logprobs)
    ours = extra_peak(fused_linear_token_logprobs)
    assert naive > 3 * 2048 * 32000 * 4 * 0.9, naive  # the probe does see the naive tensors
    assert ours < naive / 8, (ours, naive)


def test_rejects_mismatched_dtypes():
    hidden, weight, targets = make_inputs((2, 3), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        fused_linear_token_logprobs(hidden, weight.bfloat16(), targets)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_memory_target(dtype):
    """4096 tokens x hidden 896 x vocab 151936: at most 1/8 of the naive path's extra peak."""
    hidden, weight, targets = make_inputs((4096,), 896, 151936, dtype, ignore_fraction=0.0)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda()
    upstream = torch.randn(4096, device="cuda")

    def extra_peak(fn):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logprobs = fn(h, w, targets)
        (logprobs * upstream).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, logprobs.detach(), h.grad, w.grad

    ours = extra_peak(fused_linear_token_logprobs)
    naive = extra_peak(naive_linear_token_logprobs)
    assert ours[0] <= naive[0] / 8, (ours[0], naive[0])
    atol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(ours[1], naive[1], atol=atol, rtol=0)
    torch.testing.assert_close(ours[2].float(), naive[2].float(), atol=atol, rtol=1e-2)
    torch.testing.assert_close(ours[3].float(), naive[3].float(), atol=atol, rtol=1e-2)
