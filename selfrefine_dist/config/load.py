"""Load a ``Config`` from a YAML file plus ``key.sub=value`` overrides.

The YAML is merged onto the typed schema (``schema.py``) with OmegaConf, so an
undeclared key or a value of the wrong type fails at load time with the key's
full path, the file it came from and what was expected, never later inside a
training step.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from selfrefine_dist.config.schema import Config


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(f"{origin}: unknown key '{e.full_key}' ({_first_line(e)})") from None
    except ValidationError as e:
        raise ConfigError(f"{origin}: key '{e.full_key}': {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: key '{getattr(e, 'full_key', '?')}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return OmegaConf.create(data)


def _check_choices(obj: Any, path: str) -> None:
    """Walk the dataclass tree; fields declared with ``choices`` must hold one of them."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            _check_choices(item, f"{path}[{i}]")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}.{f.name}" if path else f.name
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"key '{key}': expected one of {list(allowed)}, got {value!r}")
        _check_choices(value, key)


def _check_values(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    positive = {
        "sft.micro_batch_size": cfg.sft.micro_batch_size,
        "sft.grad_accum": cfg.sft.grad_accum,
        "sft.epochs": cfg.sft.epochs,
        "data.max_len": cfg.data.max_len,
        "distributed.nproc_per_node": cfg.distributed.nproc_per_node,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "sampler.num_actors": cfg.sampler.num_actors,
        "sampler.samples_per_question": cfg.sampler.samples_per_question,
        "sampler.max_new_tokens": cfg.sampler.max_new_tokens,
        "sampler.chunk_size": cfg.sampler.chunk_size,
        "sampler.tensor_parallel_size": cfg.sampler.tensor_parallel_size,
        "sampler.hf_batch_size": cfg.sampler.hf_batch_size,
        "teach.samples_per_question": cfg.teach.samples_per_question,
        "dpo.epochs": cfg.dpo.epochs,
        "dpo.micro_batch_size": cfg.dpo.micro_batch_size,
        "dpo.grad_accum": cfg.dpo.grad_accum,
        "refine.num_learners": cfg.refine.num_learners,
        "refine.max_pairs_per_question": cfg.refine.max_pairs_per_question,
        "refine.sync_bucket_mb": cfg.refine.sync_bucket_mb,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"key '{key}': must be >= 1, got {value}")
    for key, per_forward, micro in (("sft.examples_per_forward", cfg.sft.examples_per_forward, cfg.sft.micro_batch_size),
                                    ("dpo.pairs_per_forward", cfg.dpo.pairs_per_forward, cfg.dpo.micro_batch_size)):
        if per_forward is not None and (per_forward < 1 or micro % per_forward):
            raise ConfigError(f"key '{key}': must divide the micro-batch size ({micro}), got {per_forward}")
    if cfg.distributed.zero_stage not in (None, 0, 1, 2, 3):
        raise ConfigError(f"key 'distributed.zero_stage': expected 0, 1, 2, 3 or null, got {cfg.distributed.zero_stage}")
    if cfg.refine.rounds < 0:
        raise ConfigError(f"key 'refine.rounds': must be >= 0, got {cfg.refine.rounds}")
    if not 0.0 < cfg.sampler.top_p <= 1.0:
        raise ConfigError(f"key 'sampler.top_p': must be in (0, 1], got {cfg.sampler.top_p}")
    if cfg.sampler.temperature < 0:
        raise ConfigError(f"key 'sampler.temperature': must be >= 0, got {cfg.sampler.temperature}")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"key 'dpo.beta': must be > 0, got {cfg.dpo.beta}")
    if cfg.dpo.loss_type == "robust" and not 0.0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"key 'dpo.label_smoothing': robust DPO needs [0, 0.5), got {cfg.dpo.label_smoothing}")
    if cfg.teach.enabled and bool(cfg.teach.model) == bool(cfg.teach.endpoint):
        raise ConfigError("key 'teach': set exactly one of 'teach.model' and 'teach.endpoint' when teach.enabled")
    if len(cfg.dpo.adam_betas) != 2:
        raise ConfigError(f"key 'dpo.adam_betas': expected two numbers, got {cfg.dpo.adam_betas}")
    if len(cfg.sft.adam_betas) != 2:
        raise ConfigError(f"key 'sft.adam_betas': expected two numbers, got {cfg.sft.adam_betas}")
    if any(t < 0 for t in cfg.sampler.temperature_schedule):
        raise ConfigError(f"key 'sampler.temperature_schedule': temperatures must be >= 0, got "
                          f"{cfg.sampler.temperature_schedule}")
    if cfg.refine.probe_questions < 0:
        raise ConfigError(f"key 'refine.probe_questions': must be >= 0, got {cfg.refine.probe_questions}")
    if cfg.refine.select_best_round and not cfg.data.validation:
        raise ConfigError("key 'refine.select_best_round': needs validation questions in 'data.validation'")
    for section in ("train", "eval", "validation"):
        for i, ds in enumerate(getattr(cfg.data, section)):
            if ds.source == "file" and not ds.path:
                raise ConfigError(f"key 'data.{section}[{i}].path': required when source is 'file'")


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> Config:
    """Schema defaults <- YAML file <- command-line overrides, validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _load_yaml(Path(path)), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}'")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path or 'config'}: key '{getattr(e, 'full_key', '?')}': {_first_line(e)}") from None
    _check_choices(cfg, "")
    _check_values(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of it gives back an equal ``Config``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
