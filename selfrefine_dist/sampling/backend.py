"""The interface every sampler backend implements, and how one is built from a spec.

Backends: ``VLLMBackend`` (vllm_backend.py, the fast one) and ``HFBackend``
(hf_backend.py, transformers ``generate``; the reference). Both are plain
in-process objects; ``SamplerActor`` puts one in a Ray actor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Protocol, Sequence

from selfrefine_dist.sampling.records import GeneratedText, GenerationRequest, SamplingSettings
from selfrefine_dist.sampling.weights import NamedTensor


class SamplerBackend(Protocol):
    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings) -> List[List[GeneratedText]]:
        """``request.n`` completions per request, in request order.

        The output depends only on (settings, requests) and the weights: the
        sampler's RNG is seeded from ``work_item_seed(settings.seed, requests)``.
        """

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> None:
        """Overwrite the weights from tensors in Hugging Face naming (a tied lm_head may be absent)."""

    def weight_checksums(self) -> Dict[str, str]:
        """sha256 of every parameter as held (see ``weights.expected_checksums``)."""


@dataclass(frozen=True)
class BackendSpec:
    """Everything needed to build a backend in another process (picklable)."""

    backend: str  # "vllm" or "hf"
    model_path: str
    dtype: str  # "fp32", "bf16" or "fp16"
    trust_remote_code: bool = False
    # Engine-wide seed (vLLM's own initialisation); sampling is seeded per work item.
    seed: int = 0
    # CPU threads for the backend's compute (the actor's CPU share).
    num_threads: int = 1
    # vLLM
    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: int = 1
    block_size: Optional[int] = None  # None: VLLMBackend's default (32 on CPU)
    # HF: prompts per generate call.
    hf_batch_size: int = 16


def make_backend(spec: BackendSpec) -> SamplerBackend:
    if spec.backend == "vllm":
        from selfrefine_dist.sampling.vllm_backend import VLLMBackend

        return VLLMBackend(
            spec.model_path, spec.dtype, max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size, gpu_memory_utilization=spec.gpu_memory_utilization,
            kv_cache_gib=spec.kv_cache_gib, block_size=spec.block_size, seed=spec.seed, num_threads=spec.num_threads,
            trust_remote_code=spec.trust_remote_code,
        )
    if spec.backend == "hf":
        from selfrefine_dist.sampling.hf_backend import HFBackend

        return HFBackend(spec.model_path, spec.dtype, batch_size=spec.hf_batch_size, num_threads=spec.num_threads,
                         trust_remote_code=spec.trust_remote_code)
    raise ValueError(f"unknown sampler backend {spec.backend!r}")
