"""N DPO learner ranks as Ray actors in one placement group, driven like one object.

Each method fans the call out to every rank (ZeRO-3 collectives need all of them) and
returns rank 0's answer, or the object references when the caller wants to overlap work
(the asynchronous mode samples the next round while the learners train).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from selfrefine_dist.refine.learner import DPOLearner, LearnerSpec

DEATH_GRACE_S = 10.0  # after a rank fails, how long the others may take to fail too (a peer's death shows as theirs)


class LearnerDied(RuntimeError):
    """A learner rank's process died (killed, out of memory, its node lost); the group has been stopped."""

    def __init__(self, rank: int, round_idx: Optional[int], during: str, cause: str):
        self.rank, self.round_idx, self.during = rank, round_idx, during
        where = f"round {round_idx}'s {during}" if round_idx is not None else during
        super().__init__(f"DPO learner rank {rank} died during {where} ({cause}); the learner group was stopped")


def _death_cause(error: Exception) -> str:
    """The useful part of Ray's ActorDiedError text: the pid and how the worker exited."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    pid = next((line for line in lines if line.startswith("pid:")), None)
    exit_detail = next((line[line.index("Worker exit type"):] for line in lines if "Worker exit type" in line), None)
    for boilerplate in ("Some common causes", "There are some potential"):  # Ray's list of possible causes
        if exit_detail and boilerplate in exit_detail:
            exit_detail = exit_detail[:exit_detail.index(boilerplate)].strip()
    return "; ".join(x for x in (pid, exit_detail) if x)[:400] or (lines[0][:300] if lines else type(error).__name__)


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
        self.round_idx: Optional[int] = None  # the round being trained, for error messages
        master_addr, master_port = ray.get(self.actors[0].address.remote())
        self.wait([a.setup.remote(spec, master_addr, master_port) for a in self.actors], "set-up")

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def restore(self, ckpt_root: str, round_idx: int) -> None:
        ray.get([a.restore.remote(ckpt_root, round_idx) for a in self.actors])

    def train_round_async(self, shard_refs: Sequence[ray.ObjectRef], round_idx: int) -> List[ray.ObjectRef]:
        """Start a round's DPO; ``shard_refs[r]`` is rank r's share in the object store."""
        assert len(shard_refs) == len(self.actors)
        self.round_idx = round_idx
        return [a.train_round.remote(ref, round_idx) for a, ref in zip(self.actors, shard_refs)]

    def train_round(self, shard_refs: Sequence[ray.ObjectRef], round_idx: int) -> List[Dict[str, float]]:
        return self.wait(self.train_round_async(shard_refs, round_idx), "training")[0]

    def digests(self) -> List[str]:
        return ray.get([a.digest.remote() for a in self.actors])

    def save(self, ckpt_root: str, round_idx: int) -> None:
        ray.get([a.save.remote(ckpt_root, round_idx) for a in self.actors])

    def publish_weights(self, export_dir: Optional[str], bucket_bytes: int) -> List[ray.ObjectRef]:
        """Export (if ``export_dir``) and return rank 0's weight buckets in the object store."""
        return self.wait([a.publish_weights.remote(export_dir, bucket_bytes) for a in self.actors], "weight export")[0]

    def broadcast_weights(self, pool, export_dir: Optional[str], bucket_bytes: int, version: int) -> None:
        """GPU: rank 0 broadcasts the weights over NCCL to every vLLM worker of ``pool``, bucket by bucket.

        Only bucket metadata goes through Ray; the first call sets up the NCCL group.
        """
        if not getattr(self, "_broadcast_joined", False):
            address, port = ray.get(self.actors[0].address.remote())
            world_size, joined = pool.init_weight_broadcast(address, port)
            ray.get(joined + [self.actors[0].join_weight_broadcast.remote(address, port, world_size)])
            self._broadcast_joined = True
        metas = self.wait([a.gather_for_broadcast.remote(export_dir, bucket_bytes) for a in self.actors],
                          "weight export")[0]
        pool.begin_weight_broadcast()
        for index, bucket_metas in enumerate(metas):
            received = pool.receive_weight_broadcast(bucket_metas)
            ray.get(self.actors[0].send_bucket.remote(index))
            ray.get(received)
        pool.finish_weight_broadcast(version)

    def wait(self, refs: Sequence[ray.ObjectRef], during: str) -> list:
        """``ray.get(refs)``, ``refs[r]`` being rank r's call. If a rank's process dies, stop the whole group
        (the others would wait in a collective for it) and raise ``LearnerDied`` naming that rank.

        A peer's death often reaches the other ranks first as an error of their own (a closed gloo or NCCL
        connection): after the first failure the others get ``DEATH_GRACE_S`` to fail too, and a rank
        whose process died is named before one that raised. A learner that raised with every rank alive
        (a bug, bad data) stops the group too, and its own error is raised.
        """
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            [ref], pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as first:
                grace = 0 if isinstance(first, RayActorError) else DEATH_GRACE_S  # a death: named already
                ready, _ = ray.wait(pending, num_returns=len(pending), timeout=grace) if pending else ([], [])
                errors = {rank_of[ref]: first}
                for other in ready:
                    try:
                        ray.get(other)
                    except (RayActorError, RayTaskError) as e:
                        errors[rank_of[other]] = e
                self.shutdown()
                died = sorted(rank for rank, e in errors.items() if isinstance(e, RayActorError))
                if not died:
                    raise first
                raise LearnerDied(died[0], self.round_idx, during, _death_cause(errors[died[0]])) from errors[died[0]]
        return ray.get(list(refs))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement_group)
