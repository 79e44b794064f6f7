"""use_lean_activations on tiny Llama and Qwen2 models: the same logits, every parameter's gradient equal to
the untouched model's within rounding, fewer bytes kept for the backward (exactly the ones the module doc
counts), other architectures untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from selfrefine_dist.models.lean_activations import saved_bytes, use_lean_activations

HIDDEN, INTERMEDIATE, LAYERS, TOKENS = 64, 160, 3, 23


def tiny(kind: str):
    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)).float()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).float()


def forward_keeps(model, ids) -> int:
    """Bytes kept for the backward by one forward of ``model``'s decoder, parameters left out."""
    return saved_bytes(lambda: model.model(input_ids=ids), exclude=model.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_same_logits_and_gradients(kind):
    plain = tiny(kind)
    lean = copy.deepcopy(plain)
    assert use_lean_activations(lean) == {"rms_norm": 2 * LAYERS + 1, "silu_mul": LAYERS}
    ids = torch.randint(0, 300, (2, TOKENS), generator=torch.Generator().manual_seed(1))
    want, got = plain(input_ids=ids, labels=ids), lean(input_ids=ids, labels=ids)
    assert torch.equal(got.logits, want.logits)  # the same ops in the same order
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_fewer_activation_bytes_by_the_count():
    plain = tiny("llama")
    lean = copy.deepcopy(plain)
    use_lean_activations(lean)
    ids = torch.randint(0, 300, (1, TOKENS), generator=torch.Generator().manual_seed(2))
    fewer = forward_keeps(plain, ids) - forward_keeps(lean, ids)
    # per token and layer: x * rstd of both norms (2 x hidden) and SiLU(gate) (intermediate), fp32
    assert fewer == LAYERS * TOKENS * (2 * HIDDEN + INTERMEDIATE) * 4 + TOKENS * HIDDEN * 4  # + the final norm's


def test_idempotent_and_other_architectures_untouched():
    model = tiny("llama")
    use_lean_activations(model)
    ids = torch.randint(0, 300, (1, 9))
    before = model(input_ids=ids).logits
    assert use_lean_activations(model) == {"rms_norm": 2 * LAYERS + 1, "silu_mul": LAYERS}
    assert torch.equal(model(input_ids=ids).logits, before)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2))
    assert use_lean_activations(gpt2) == {"rms_norm": 0, "silu_mul": 0}
    assert all("forward" not in vars(m) for m in gpt2.modules())
