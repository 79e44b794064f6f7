"""N DPO learner ranks as Ray actors in one placement group, driven like one object.

Each method fans the call out to every rank (ZeRO-3 collectives need all of them) and
returns rank 0's answer, or the object references when the caller wants to overlap work
(the asynchronous mode samples the next round while the learners train).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from selfrefine_dist.refine.learner import DPOLearner, LearnerSpec


class LearnerGroup:
    def __init__(self, spec: LearnerSpec, num_learners: int, cpus_per_learner: float = 1.0,
                 gpus_per_learner: float = 0.0, env: Optional[Dict[str, str]] = None):
        bundles = [{"CPU": cpus_per_learner, **({"GPU": gpus_per_learner} if gpus_per_learner else {})}
                   for _ in range(num_learners)]
        # PACK keeps ranks on as few nodes as possible (fast collectives); Ray spreads when it must.
        self.placement_group = placement_group(bundles, strategy="PACK")
        ray.get(self.placement_group.ready())
        remote_cls = ray.remote(DPOLearner)
        self.actors = [
            remote_cls.options(
                num_cpus=cpus_per_learner, num_gpus=gpus_per_learner,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
                runtime_env={"env_vars": dict(env or {})},
            ).remote(i, num_learners)
            for i in range(num_learners)
        ]
        master_addr, master_port = ray.get(self.actors[0].address.remote())
        ray.get([a.setup.remote(spec, master_addr, master_port) for a in self.actors])

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def restore(self, ckpt_root: str, round_idx: int) -> None:
        ray.get([a.restore.remote(ckpt_root, round_idx) for a in self.actors])

    def train_round_async(self, shard_refs: Sequence[ray.ObjectRef], round_idx: int) -> List[ray.ObjectRef]:
        """Start a round's DPO; ``shard_refs[r]`` is rank r's share in the object store."""
        assert len(shard_refs) == len(self.actors)
        return [a.train_round.remote(ref, round_idx) for a, ref in zip(self.actors, shard_refs)]

    def train_round(self, shard_refs: Sequence[ray.ObjectRef], round_idx: int) -> List[Dict[str, float]]:
        return ray.get(self.train_round_async(shard_refs, round_idx))[0]

    def digests(self) -> List[str]:
        return ray.get([a.digest.remote() for a in self.actors])

    def save(self, ckpt_root: str, round_idx: int) -> None:
        ray.get([a.save.remote(ckpt_root, round_idx) for a in self.actors])

    def publish_weights(self, export_dir: Optional[str], bucket_bytes: int) -> List[ray.ObjectRef]:
        """Export (if ``export_dir``) and return rank 0's weight buckets in the object store."""
        return ray.get([a.publish_weights.remote(export_dir, bucket_bytes) for a in self.actors])[0]

    def broadcast_weights(self, pool, export_dir: Optional[str], bucket_bytes: int, version: int) -> None:
        """GPU: rank 0 broadcasts the weights over NCCL to every vLLM worker of ``pool``, bucket by bucket.

        Only bucket metadata goes through Ray; the first call sets up the NCCL group.
        """
        if not getattr(self, "_broadcast_joined", False):
            address, port = ray.get(self.actors[0].address.remote())
            world_size, joined = pool.init_weight_broadcast(address, port)
            ray.get(joined + [self.actors[0].join_weight_broadcast.remote(address, port, world_size)])
            self._broadcast_joined = True
        metas = ray.get([a.gather_for_broadcast.remote(export_dir, bucket_bytes) for a in self.actors])[0]
        pool.begin_weight_broadcast()
        for index, bucket_metas in enumerate(metas):
            received = pool.receive_weight_broadcast(bucket_metas)
            ray.get(self.actors[0].send_bucket.remote(index))
            ray.get(received)
        pool.finish_weight_broadcast(version)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement_group)
