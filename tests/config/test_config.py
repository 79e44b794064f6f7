"""Config loading: YAML + overrides on the typed schema, with errors that name the key."""
from pathlib import Path

import pytest

from selfrefine_dist.config import Config, ConfigError, load_config, to_yaml

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_a_config():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.distributed.zero_stage is None  # 0 on one rank, 3 on several (ds_config.resolve_zero_stage)
    assert cfg.model.trust_remote_code is False


def test_yaml_then_override(tmp_path):
    path = write(tmp_path, "sft:\n  lr: 3.0e-5\n  micro_batch_size: 2\ndata:\n  train:\n    - {task: csqa, source: offline}\n")
    cfg = load_config(path, ["sft.lr=1e-4", "data.max_len=256"])
    assert cfg.sft.lr == pytest.approx(1e-4)  # override wins over the file
    assert cfg.sft.micro_batch_size == 2  # file wins over the default
    assert cfg.data.max_len == 256
    assert cfg.data.train[0].task == "csqa" and cfg.data.train[0].source == "offline"
    assert cfg.data.train[0].split == "train"  # list items get the item schema's defaults


def test_unknown_key_in_file_names_full_path_and_file(tmp_path):
    path = write(tmp_path, "sft:\n  lora:\n    rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "sft.lora.rank" in str(e.value) and str(path) in str(e.value)


def test_unknown_key_in_list_item(tmp_path):
    path = write(tmp_path, "data:\n  eval:\n    - {task: gsm8k, splt: test}\n")
    with pytest.raises(ConfigError, match=r"data\.eval\[0\]\.splt|splt"):
        load_config(path)


def test_unknown_key_in_override():
    with pytest.raises(ConfigError, match=r"override 'sft\.learning_rate=1'.*sft\.learning_rate"):
        load_config(None, ["sft.learning_rate=1"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "sft:\n  micro_batch_size: four\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "sft.micro_batch_size" in msg and "int" in msg.lower()


def test_wrong_type_bool():
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        load_config(None, ["model.trust_remote_code=maybe"])


def test_choice_field_rejects_other_values():
    with pytest.raises(ConfigError, match=r"model\.dtype.*'auto', 'bf16', 'fp32', 'fp16'.*'bf17'"):
        load_config(None, ["model.dtype=bf17"])
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.source"):
        load_config(None, ["data.train=[{task: gsm8k, source: web}]"])


def test_range_checks():
    with pytest.raises(ConfigError, match="distributed.zero_stage"):
        load_config(None, ["distributed.zero_stage=4"])
    with pytest.raises(ConfigError, match="sft.grad_accum"):
        load_config(None, ["sft.grad_accum=0"])
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.path"):
        load_config(None, ["data.train=[{task: gsm8k, source: file}]"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "sft: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["sft.lr"])


def test_round_trip_of_resolved_config(tmp_path):
    cfg = load_config(None, ["sft.lr=2e-5", "data.train=[{task: obqa, source: offline, limit: 10}]",
                             "sft.lora.enabled=true", "model.revision=main"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), Config)
