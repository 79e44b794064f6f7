"""causal_token_logprobs: the fused head path against the logits path (values and gradients, fp32).

The fused path must give the same log-probs and the same gradient for every parameter as
full logits + cross_entropy, for the tiny Llama of conftest (tied embeddings, like
SmolLM2), an untied head, padded batches and a peft LoRA model; and it must not build
[tokens x vocab] logits. Heads it cannot reproduce exactly take the logits path.
The ZeRO-3 engine case runs in tests/train/test_sft_zero3.py (and the kernel's own
2-process check in tests/kernels/test_zero3_fused_linear.py).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfrefine_dist.models import logprobs as logprobs_module  # noqa: E402
from selfrefine_dist.models.logprobs import causal_token_logprobs  # noqa: E402


def make_batch(vocab_size: int, seed: int = 0):
    """2 sequences of 16 tokens: the second right-padded by 5; prompts of 4 and 6 tokens ignored."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 16), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0
    input_ids[1, 11:] = 0
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, :6] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def logits_path(model, input_ids, attention_mask, labels):
    return logprobs_module._logits_path_logprobs(model, input_ids, attention_mask, labels[:, 1:])


def values_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    logps = fn(model, *batch)
    upstream = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1))
    (logps * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


def assert_fused_matches_logits_path(model, batch):
    assert logprobs_module._fused_head(model) is not None, "the fused path should be taken"
    fused, fused_grads = values_and_grads(causal_token_logprobs, model, batch)
    ref, ref_grads = values_and_grads(logits_path, model, batch)
    labels = batch[2]
    assert fused.dtype == torch.float32 and fused.shape == (labels.shape[0], labels.shape[1] - 1)
    assert (fused[labels[:, 1:] == -100] == 0).all()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(fused_grads) == set(ref_grads) == trainable
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def lm_head_output_shapes(model, batch):
    """Shapes of what the lm_head module returned during one causal_token_logprobs call."""
    shapes = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        with torch.no_grad():
            causal_token_logprobs(model, *batch)
    finally:
        handle.remove()
    return shapes


def tiny_llama(tie_word_embeddings: bool, vocab_size: int = 211, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def test_conftest_tiny_llama_tied(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = make_batch(model.config.vocab_size)
    assert_fused_matches_logits_path(model, batch)
    # The model's own head projected no position (an empty index), never [batch, seq, vocab].
    assert lm_head_output_shapes(model, batch) == [(2, 0, model.config.vocab_size)]


@pytest.mark.parametrize("tied", [False, True])
def test_llama_untied_and_tied(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_fused_matches_logits_path(model, make_batch(211))


def test_no_grad_reference_logprobs():
    model = tiny_llama(tie_word_embeddings=True)
    batch = make_batch(211)
    with torch.no_grad():
        fused = causal_token_logprobs(model, *batch)
        ref = logits_path(model, *batch)
    assert not fused.requires_grad
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = tiny_llama(tie_word_embeddings=True)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    # Non-zero B matrices, so the adapters change the output and get gradients of their own.
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert_fused_matches_logits_path(lora, make_batch(211))


def test_lora_on_the_head_takes_the_logits_path():
    """A LoRA-adapted lm_head is not ``hidden @ weight.T``: the fused path would drop the adapter."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama(tie_word_embeddings=False),
                               peft.LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    assert logprobs_module._fused_head(lora) is None
    batch = make_batch(211)
    with torch.no_grad():
        torch.testing.assert_close(causal_token_logprobs(lora, *batch), logits_path(lora, *batch))


def test_soft_capped_head_takes_the_logits_path():
    """Gemma 2 soft-caps its logits (30 * tanh(logits / 30)): not in FUSED_MODEL_TYPES."""
    config = transformers.Gemma2Config(
        vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=1.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).float()
    assert logprobs_module._fused_head(model) is None
    batch = make_batch(211)
    with torch.no_grad():
        ours = causal_token_logprobs(model, *batch)
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1]
    # Check against a direct computation: the soft-capping must be in the answer.
    targets = batch[2][:, 1:]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(ours, expected * (targets != -100), atol=1e-5, rtol=0)
    assert lm_head_output_shapes(model, batch)[0] == (2, 16, 211)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_preference_loss_through_the_model(tied):
    """The learner's fused DPO path (causal_hidden_states + fused_linear_preference_loss) gives
    the loss and every parameter's gradient of the logits path + dpo_loss (RPO on)."""
    from selfrefine_dist.kernels import fused_linear_preference_loss
    from selfrefine_dist.losses import dpo_loss
    from selfrefine_dist.models.logprobs import causal_hidden_states

    model = tiny_llama(tie_word_embeddings=tied)
    input_ids, attention_mask, labels = make_batch(211)  # pair 0: row 0 chosen, row 1 rejected
    targets = labels[:, 1:]
    lengths = (targets != -100).sum(1)
    ref = torch.tensor([-30.0, -25.0])

    def loss_of(chosen, rejected):
        return dpo_loss(chosen, rejected, ref[:1], ref[1:], 0.1, chosen_lengths=lengths[:1],
                        rejected_lengths=lengths[1:], rpo_alpha=0.5).loss

    logps = logits_path(model, input_ids, attention_mask, labels).sum(-1)
    want = loss_of(logps[:1], logps[1:])
    want.backward()
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hidden, weight = causal_hidden_states(model, input_ids, attention_mask)
    loss, fused_logps = fused_linear_preference_loss(hidden, weight, targets, loss_of, chunk_tokens=4)
    loss.backward()
    torch.testing.assert_close(fused_logps, logps.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_packed_pairs_match_two_sequences(tied):
    """A pair packed as one row (prompt once) gives the same response log-probs, DPO loss and
    parameter gradients as the pair as two padded sequences (learner.head_inputs, both layouts)."""
    from selfrefine_dist.kernels import fused_linear_preference_loss
    from selfrefine_dist.losses import dpo_loss
    from selfrefine_dist.refine.learner import head_inputs
    from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_pairs
    from selfrefine_dist.refine.records import PreferenceExample

    model = tiny_llama(tie_word_embeddings=tied)
    gen = torch.Generator().manual_seed(3)

    def ids(n):
        return tuple(torch.randint(3, 211, (n,), generator=gen).tolist())

    examples = [PreferenceExample("a", ids(7), ids(5), ids(9)), PreferenceExample("b", ids(4), ids(8), ids(2))]
    ref = torch.tensor([-40.0, -35.0, -42.0, -20.0])
    results = []
    for batch in (collate_pairs(examples, 0), collate_packed_pairs(examples, 0)):
        model.zero_grad(set_to_none=True)
        hidden, weight, targets = head_inputs(model, batch, torch.device("cpu"))
        lengths = (targets != -100).sum(1)

        def loss_of(c, r):
            return dpo_loss(c, r, ref[:2], ref[2:], 0.1, chosen_lengths=lengths[:2], rejected_lengths=lengths[2:],
                            rpo_alpha=0.5).loss

        loss, logps = fused_linear_preference_loss(hidden, weight, targets, loss_of)
        loss.backward()
        results.append((loss.detach(), logps, lengths, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, logps_a, len_a, grads_a), (loss_b, logps_b, len_b, grads_b) = results
    assert len_a.tolist() == len_b.tolist() == [5, 8, 9, 2]
    torch.testing.assert_close(logps_b, logps_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_causal_nll_sum_matches_the_logits_path(tied):
    """The SFT loss through the fused NLL (gradients made in the forward) equals the logits path."""
    from selfrefine_dist.models.logprobs import causal_nll_sum

    model = tiny_llama(tie_word_embeddings=tied)
    batch = make_batch(211)
    want = -logits_path(model, *batch).sum()
    want.backward()
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = causal_nll_sum(model, *batch)
    (loss * 1.0).backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-4, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
