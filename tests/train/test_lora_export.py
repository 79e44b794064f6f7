"""LoRA through peft under ZeRO-3: adapters train, and the export merges them into plain weights."""
import json

import pytest
import torch

from sft_cli import run_cli

pytestmark = pytest.mark.slow


def test_lora_sft_exports_merged_model(tiny_model_dir, tmp_path):
    run_cli(tmp_path, tiny_model_dir, "distributed.nproc_per_node=1", "sft.micro_batch_size=4", "sft.grad_accum=1",
            "sft.max_steps=2", "sft.lr=5e-3", "sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.alpha=8",
            "sft.lora.dropout=0.0")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    keys = exported.state_dict().keys()
    assert keys == base.state_dict().keys()  # plain transformers keys: no lora_A/lora_B, no base_layer
    changed = {k for k in keys if not torch.equal(exported.state_dict()[k], base.state_dict()[k])}
    # LoRA touched the attention projections it targets, and nothing else
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2
