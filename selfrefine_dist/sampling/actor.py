"""``SamplerActor``: one backend in a Ray actor, with the version of the weights it holds.

The class is plain Python (usable in-process); ``remote_sampler_actor`` makes
the Ray actor class. Ray restarts a dead actor (``max_restarts``) by running
``__init__`` again: the restarted actor holds the checkpoint's weights
(version 0) until ``update_weights`` brings it up to date, which
``SamplerPool`` does before giving it more work.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import ray

from selfrefine_dist.sampling.backend import BackendSpec, make_backend
from selfrefine_dist.sampling.records import GeneratedText, GenerationRequest, SamplingSettings
from selfrefine_dist.sampling.weights import TensorMeta


class SamplerActor:
    def __init__(self, spec: BackendSpec):
        self.backend = make_backend(spec)
        self.weights_version = 0  # the checkpoint at spec.model_path

    def ready(self) -> int:
        """The actor's process id, once the backend is built."""
        return os.getpid()

    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings) -> List[List[GeneratedText]]:
        return self.backend.generate(requests, settings)

    def engine_settings(self) -> Dict[str, object]:
        """The vLLM engine's KV cache settings (block size, prefix caching)."""
        return self._vllm("engine settings").engine_settings()

    def update_weights(self, bucket_refs: Sequence[ray.ObjectRef], version: int) -> float:
        """Load every bucket (``List[(hf_name, tensor)]`` each) from the object store; returns seconds.

        Buckets are fetched one at a time, so the actor holds at most one
        bucket beyond its model. The buckets' copies are freed in the middle of the heap, where glibc
        keeps them resident: trimmed afterwards, or a vLLM actor grew by 0.3 GiB a sync (SmolLM2-135M
        fp32; 20 ms a trim).
        """
        from selfrefine_dist.train.memory import trim_heap

        start = time.perf_counter()
        self.backend.load_weights(named for ref in bucket_refs for named in ray.get(ref))
        trim_heap()
        self.weights_version = version
        return time.perf_counter() - start

    def ensure_version(self, bucket_refs: Sequence[ray.ObjectRef], version: int) -> int:
        """Load the buckets unless the actor already holds ``version``; returns the version held."""
        if self.weights_version != version:
            self.update_weights(bucket_refs, version)
        return self.weights_version

    def version(self) -> int:
        return self.weights_version

    def where(self) -> tuple:
        """(Ray node id, process id): which node holds this actor."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def peak_rss_gib(self) -> float:
        """Peak resident memory of this actor, GiB: its own process's peak (VmHWM) plus that of each
        process it started (vLLM's engine core), an upper bound of their peak together."""
        return sum(_peak_rss_bytes(pid) for pid in _process_tree(os.getpid())) / 1024**3

    def checksums(self) -> Dict[str, str]:
        return self.backend.weight_checksums()

    # GPU weight sync over NCCL (nccl_sync.py; driven by refine/sync.py's NcclSync); vLLM backend only.
    def weight_broadcast(self, step: str, *args) -> None:
        """One step of an NCCL sync: ``init`` (master_address, master_port, rank_offset, world_size: the
        engine's workers join learner rank 0's group), ``begin``, ``receive`` (bucket metas: the next
        broadcast bucket), ``finish`` (version: the weights now held)."""
        vllm = self._vllm("NCCL weight sync")
        if step == "init":
            vllm.init_weight_broadcast(*args)
        elif step == "begin":
            vllm.begin_weight_sync()
        elif step == "receive":
            vllm.receive_weight_broadcast(*args)
        elif step == "finish":
            vllm.finish_weight_sync()
            self.weights_version = args[0]
        else:
            raise ValueError(f"unknown weight broadcast step {step!r}")

    def _vllm(self, what: str):
        from selfrefine_dist.sampling.vllm_backend import VLLMBackend

        if not isinstance(self.backend, VLLMBackend):
            raise TypeError(f"{what} needs the vLLM backend, not {type(self.backend).__name__}")
        return self.backend


def _process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants (only ``pid`` where psutil is missing)."""
    try:
        import psutil
    except ImportError:
        return [pid]
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def _peak_rss_bytes(pid: int) -> int:
    """A process's peak resident memory (VmHWM, Linux); 0 when it cannot be read (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def remote_sampler_actor(num_cpus: float, num_gpus: float, max_restarts: int,
                         resources: Optional[Dict[str, float]] = None):
    """The Ray actor class of ``SamplerActor`` with its resources (``resources``: custom Ray resources,
    which place it on the nodes that have them) and restart policy."""
    return ray.remote(SamplerActor).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                            resources=dict(resources or {}))
