"""Fused log-prob kernels (installed as ``selfrefine_dist.kernels``).

- ``token_logprobs(logits, targets)``: log softmax(logits)[targets] without an fp32 [N x V] tensor.
- ``fused_linear_token_logprobs(hidden, lm_head_weight, targets)``: the same from hidden
  states, chunked over tokens so the full logits never exist; ZeRO-3 aware.
- ``fused_linear_nll_loss(hidden, lm_head_weight, targets, token_weights)``: the SFT loss, its
  gradients made in the forward (three matmuls, not four).
- ``fused_linear_preference_loss(hidden, lm_head_weight, targets, pair_loss)``: a DPO-family
  loss from hidden states, its gradients computed in the forward (three matmuls, not four).
- ``reference``: the plain torch definitions both are tested against.
- ``decoder_ops``: ``rms_norm`` and ``silu_mul``, autograd functions that keep fewer activations
  for the backward than the Hugging Face modules they stand in for (``models/lean_activations.py``).

Triton runs on CUDA tensors; CPU tensors take an equivalent chunked torch path.
"""

# This folder installs as ``selfrefine_dist.kernels``. Python can also find it as a top-level
# ``kernels`` when the checkout's root is on sys.path (``python -m ...`` run from the root), and
# transformers imports ``kernels`` to probe for Hugging Face's hub-kernels package. Under that
# name it stays an empty module, so the probe finds nothing usable and imports nothing of ours.
if __name__ == "selfrefine_dist.kernels":
    from .fused_linear_logprobs import fused_linear_token_logprobs
    from .fused_linear_nll import fused_linear_nll_loss
    from .fused_linear_preference import fused_linear_preference_loss
    from .reference import naive_linear_token_logprobs, naive_token_logprobs
    from .token_logprobs import token_logprobs
    from .zero3 import gathered_weight

    __all__ = [
        "fused_linear_nll_loss",
        "fused_linear_preference_loss",
        "fused_linear_token_logprobs",
        "gathered_weight",
        "naive_linear_token_logprobs",
        "naive_token_logprobs",
        "token_logprobs",
    ]
