"""``export_state`` writes exactly what the model's own ``save_pretrained`` writes (the reference)."""
import pytest
import torch
from safetensors.torch import load_file

from selfrefine_dist.models.tiny import build_tiny_llama
from selfrefine_dist.train.export import export_state, gather_state_dict

CORPUS = ["Janet has 3 apples and buys 4 more. The answer is 7."] * 20


def saved_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_writes_what_save_pretrained_writes(tmp_path, tied, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_tiny_llama(tmp_path / "src", CORPUS, seed=1, hidden_size=64, vocab_size=300, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    with torch.no_grad():  # weights no initialisation could produce: a skipped load would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tokenizer = AutoTokenizer.from_pretrained(src)

    model.save_pretrained(tmp_path / "reference")
    out = export_state(model, gather_state_dict(model), tokenizer, tmp_path / "export")

    expected, written = saved_tensors(tmp_path / "reference"), saved_tensors(out)
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == dtype
        assert torch.equal(written[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
