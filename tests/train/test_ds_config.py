"""train/ds_config.py: the ZeRO stage per layout and the DeepSpeed config built from plain values."""
from selfrefine_dist.train.ds_config import deepspeed_config, resolve_zero_stage


def test_zero_stage_follows_the_layout_unless_set():
    assert resolve_zero_stage(None, 1) == 0  # one rank: nothing to partition
    assert resolve_zero_stage(None, 2) == 3
    assert resolve_zero_stage(None, 16) == 3
    assert resolve_zero_stage(2, 1) == 2 and resolve_zero_stage(0, 8) == 0  # a set stage is kept


def test_config_batch_sizes_and_stage3_gathering():
    cfg = deepspeed_config(micro_batch_size=2, grad_accum=4, world_size=3, zero_stage=3, dtype="bf16")
    assert cfg["train_batch_size"] == 2 * 4 * 3
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "stage3_gather_16bit_weights_on_model_save" not in deepspeed_config(1, 1, 1, 0)["zero_optimization"]
