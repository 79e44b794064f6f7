"""Weight sync: the learners' new weights into every sampler actor, as one version, in one call.

    sync = make_weight_sync(cfg)                                   # ObjectStoreSync or NcclSync
    timing = sync.push(learners, pool, export_dir, version=r)      # SyncTiming(export_s, transfer_s)

Both gather the ZeRO-3 weights on learner rank 0 and export ``export_dir`` (the round's Hugging
Face folder); they differ in how the bytes travel:

- ``ObjectStoreSync`` (CPU, and wherever NCCL is not available): rank 0 puts buckets of tensors into
  Ray's object store and every sampler actor loads them while the learners write the folder; the
  pool keeps the refs, so an actor that restarts later is brought to the same version from them.
- ``NcclSync`` (GPU): rank 0 broadcasts each bucket over NCCL to every vLLM worker; only bucket
  metadata goes through Ray. The handshake (rank 0 and every worker join one NCCL group) happens on the
  first push and again whenever the learner group or the pool's live actors changed. The sequence and
  its constraints are in ``sampling/nccl_sync.py``.

``load_folder_into_pool`` sends an exported folder's weights (a rerun's samplers, base/SFT evaluation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import ray
import torch

from selfrefine_dist.config import Config


@dataclass(frozen=True)
class SyncTiming:
    export_s: float  # gather on the learners, export the folder (object store: the part not hidden by the transfer)
    transfer_s: float  # into every sampler actor

    @property
    def total_s(self) -> float:
        return self.export_s + self.transfer_s


class WeightSync:
    """Moves a learner group's weights into every live actor of a sampler pool as ``version``."""

    name = ""

    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes

    def push(self, learners, pool, export_dir: Optional[str], version: int) -> SyncTiming:
        raise NotImplementedError


class ObjectStoreSync(WeightSync):
    name = "object_store"

    def push(self, learners, pool, export_dir: Optional[str], version: int) -> SyncTiming:
        t0 = time.perf_counter()
        bucket_refs = learners.put_weights(self.bucket_bytes)
        exporting = learners.export_put_weights_async(export_dir)  # the folder is written ...
        put_s = time.perf_counter() - t0
        transfer_s = pool.update_weights(bucket_refs, version=version)  # ... while the samplers load the buckets
        t0 = time.perf_counter()
        learners.wait(exporting, "weight export")
        return SyncTiming(put_s + time.perf_counter() - t0, transfer_s)


class NcclSync(WeightSync):
    name = "nccl"

    def __init__(self, bucket_bytes: int):
        super().__init__(bucket_bytes)
        self.joined = None  # (learner group, live sampler actors) of the NCCL group set up last

    def push(self, learners, pool, export_dir: Optional[str], version: int) -> SyncTiming:
        if self.joined != (id(learners), tuple(pool.live_actors)):
            self._handshake(learners, pool)
        t0 = time.perf_counter()
        metas = learners.wait([a.gather_for_broadcast.remote(export_dir, self.bucket_bytes) for a in learners.actors],
                              "weight export")[0]
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.get(pool.on_live_actors("weight_broadcast", "begin"))
        for index, bucket_metas in enumerate(metas):
            received = pool.on_live_actors("weight_broadcast", "receive", list(bucket_metas))
            ray.get(learners.actors[0].send_bucket.remote(index))
            ray.get(received)
        ray.get(pool.on_live_actors("weight_broadcast", "finish", version))
        pool.broadcast_done(version)
        return SyncTiming(export_s, time.perf_counter() - t0)

    def _handshake(self, learners, pool) -> None:
        """Learner rank 0 (rank 0 of the group) and every vLLM worker of the live actors join one group."""
        address, port = ray.get(learners.actors[0].address.remote())
        tp, live = pool.spec.tensor_parallel_size, pool.live_actors
        world_size = 1 + len(live) * tp
        joined = [pool.actors[a].weight_broadcast.remote("init", address, port, 1 + i * tp, world_size)
                  for i, a in enumerate(live)]
        ray.get(joined + [learners.actors[0].join_weight_broadcast.remote(address, port, world_size)])
        self.joined = (id(learners), tuple(live))


def make_weight_sync(cfg: Config) -> WeightSync:
    """``refine.weight_sync``; auto: NCCL when learners and vLLM samplers both hold GPUs, else the object store."""
    r, sampler = cfg.refine, cfg.sampler
    bucket_bytes = r.sync_bucket_mb << 20
    nccl = (r.gpus_per_learner > 0 and sampler.gpus_per_actor > 0 and sampler.backend == "vllm"
            if r.weight_sync == "auto" else r.weight_sync == "nccl")
    return NcclSync(bucket_bytes) if nccl else ObjectStoreSync(bucket_bytes)


def read_folder_state(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights to load into the samplers")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_folder_into_pool(pool, folder: str, version: int, bucket_bytes: int) -> float:
    """Send ``folder``'s weights to every sampler as ``version``; returns the seconds it took."""
    from selfrefine_dist.sampling.weights import named_tensor_buckets

    state = read_folder_state(folder)
    refs = [ray.put(bucket) for bucket in named_tensor_buckets(state.items(), bucket_bytes)]
    return pool.update_weights(refs, version=version)
