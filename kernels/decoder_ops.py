"""A decoder layer's element-wise parts as autograd functions that save less for the backward.

Autograd keeps what each recorded op's derivative needs. In a Llama-style layer RMSNorm and
SiLU(gate) * up are chains of small ops whose links each keep their own inputs. Per token and
layer, in floats (SmolLM2-135M: hidden 576, MLP 1536; the linear layers' inputs are kept either way):

    op                 autograd keeps                  these keep      fewer
    RMSNorm (x2)       x, x * rstd                     x, rstd         2 x 576
    SiLU(gate) * up    gate, SiLU(gate), up            gate, up        1536

so 2688 of SmolLM2's 11190 floats a token and layer (24%; one forward of a 375-token row keeps
480 MiB, 364 MiB with these). Each backward recomputes the rest (x * rstd; SiLU(gate)): a few
element-wise passes. The rotary embedding needs nothing: multiplying by cos and sin, which take
no gradient, keeps only cos and sin. Liger-Kernel fuses the same ops in Triton on GPUs; these are
plain torch ops, on any device. Forward values equal the Hugging Face modules' op for op;
gradients equal theirs up to rounding. The modules they stand in for
(``selfrefine_dist/models/lean_activations.py`` swaps them in) are the references the tests
compare against.
"""
from __future__ import annotations

import torch


class RMSNormFunction(torch.autograd.Function):
    """x [..., H], weight [H] -> weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype); saves x and rstd [..., 1].

    Statistics in fp32 for fp32 and half inputs (as Hugging Face's), fp64 for fp64 (gradchecks)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd  # the normalized input, recomputed
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # d out / d weight is x_hat rounded as the forward rounded it; summed over tokens in fp32
            grad_weight = (grad_out.to(rstd.dtype) * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(rstd.dtype)  # d loss / d x_hat
            # d x_hat / d x: rstd * (g - x_hat * mean(g * x_hat))
            grad_x = (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SiluMulFunction(torch.autograd.Function):
    """gate, up [..., I] -> silu(gate) * up; saves gate and up, recomputes silu(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_up = grad_out * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        # torch's own fused SiLU derivative: grad * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SiluMulFunction.apply(gate, up)

