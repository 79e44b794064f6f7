"""N learner ranks as Ray actors in one placement group, driven like one object: SFT, then DPO rounds,
on the same ranks.

    group = LearnerGroup(None, n, backend="auto", threads=1)   # ranks placed and connected
    group.train_sft(config_file, run_dir)                      # SFT on the group (``selfrefine run``)
    group.setup(spec)                                          # a DPO policy from the exported SFT model
    group.setup_async(spec); ...; group.ready()                # the same, while the caller does other work
    group.train_round(shard_refs, round_idx) ...

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

from selfrefine_dist.refine.learner import Learner, LearnerSpec

DEATH_GRACE_S = 10.0  # after a rank fails, how long the others may take to fail too (a peer's death shows as theirs)


class LearnerDied(RuntimeError):
    """A learner rank's process died (killed, out of memory, its node lost); the group has been stopped."""

    def __init__(self, rank: int, round_idx: Optional[int], during: str, cause: str):
        self.rank, self.round_idx, self.during = rank, round_idx, during
        where = f"round {round_idx}'s {during}" if round_idx is not None else during
        kind = "SFT" if during == "SFT" else "DPO"
        super().__init__(f"{kind} learner rank {rank} died during {where} ({cause}); the learner group was stopped")


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
    """``spec``: build the DPO policy at once (``setup``); None: ranks connected, no engine yet (SFT first).
    ``backend`` and ``threads`` are the process group's and torch's when ``spec`` is None."""

    def __init__(self, spec: Optional[LearnerSpec], num_learners: int, cpus_per_learner: float = 1.0,
                 gpus_per_learner: float = 0.0, env: Optional[Dict[str, str]] = None, backend: str = "auto",
                 threads: int = 1, resources: Optional[Dict[str, float]] = None, wait_for_setup: bool = True):
        # ``resources``: custom Ray resources per rank, which put the ranks on the nodes that have them
        bundles = [{"CPU": cpus_per_learner, **({"GPU": gpus_per_learner} if gpus_per_learner else {}),
                    **dict(resources or {})} for _ in range(num_learners)]
        # PACK keeps ranks on as few nodes as possible (fast collectives); Ray spreads when it must.
        self.placement_group = placement_group(bundles, strategy="PACK")
        ray.get(self.placement_group.ready())
        remote_cls = ray.remote(Learner)
        self.actors = [
            remote_cls.options(
                num_cpus=cpus_per_learner, num_gpus=gpus_per_learner, resources=dict(resources or {}),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
                runtime_env={"env_vars": dict(env or {})},
            ).remote(i, num_learners)
            for i in range(num_learners)
        ]
        self.round_idx: Optional[int] = None  # the round being trained, for error messages
        self.spec: Optional[LearnerSpec] = None  # the DPO settings of the policy the ranks hold
        self.pending_setup: List[ray.ObjectRef] = []  # set-up calls not waited for yet (``ready``)
        self.master = ray.get(self.actors[0].address.remote())
        self.ranks_at = ray.get([a.where.remote() for a in self.actors])  # asked before any long set-up call
        if spec is not None:
            self.setup_async(spec)
            if wait_for_setup:
                self.ready()
        else:
            self.wait([a.connect.remote(*self.master, backend, threads) for a in self.actors], "set-up")

    def setup(self, spec: LearnerSpec) -> None:
        """Every rank builds the DPO policy engine from ``spec.policy_path`` (dropping the one it held)."""
        self.setup_async(spec)
        self.ready()

    def setup_async(self, spec: LearnerSpec) -> None:
        """``setup`` without waiting: the ranks build their engines while the caller goes on (the driver
        samples the round meanwhile); ``ready`` waits, and every call that trains waits first."""
        self.ready()
        self.pending_setup = [a.setup.remote(spec, *self.master) for a in self.actors]
        self.spec = spec

    def ready(self) -> None:
        """Wait for a set-up started by ``setup_async`` (raises ``LearnerDied`` if a rank died in it)."""
        pending, self.pending_setup = self.pending_setup, []
        if pending:
            self.wait(pending, "set-up")

    def train_sft(self, config_file: str, run_dir: str) -> str:
        """SFT on the group's ranks (``run_sft``, as under torchrun); returns the exported model folder."""
        self.round_idx = None
        return self.wait([a.train_sft.remote(config_file, run_dir) for a in self.actors], "SFT")[0]

    def placement(self) -> List[tuple]:
        """(Ray node id, pid) of each rank."""
        return list(self.ranks_at)

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def restore(self, ckpt_root: str, round_idx: int) -> None:
        self.ready()
        ray.get([a.restore.remote(ckpt_root, round_idx) for a in self.actors])

    def train_round_async(self, shard_refs: Sequence[ray.ObjectRef], round_idx: int,
                          known_reference_logps: Optional[Dict[str, float]] = None) -> List[ray.ObjectRef]:
        """Start a round's DPO; ``shard_refs[r]`` is rank r's share in the object store
        (``known_reference_logps``: see ``Learner.train_round``)."""
        assert len(shard_refs) == len(self.actors)
        self.ready()
        self.round_idx = round_idx
        known = ray.put(known_reference_logps)
        return [a.train_round.remote(ref, round_idx, known) for a, ref in zip(self.actors, shard_refs)]

    def train_round(self, shard_refs: Sequence[ray.ObjectRef], round_idx: int,
                    known_reference_logps: Optional[Dict[str, float]] = None) -> List[Dict[str, float]]:
        return self.wait(self.train_round_async(shard_refs, round_idx, known_reference_logps), "training")[0]

    def computed_reference_logps(self) -> Dict[str, float]:
        """The values the ranks' last reference pass computed (hex key -> log-prob); a sequence two ranks
        ran has the lower rank's value."""
        table: Dict[str, float] = {}
        for rank_table in ray.get([a.computed_reference_logps.remote() for a in self.actors]):
            for key, logp in rank_table.items():
                table.setdefault(key, logp)
        return table

    def digests(self) -> List[str]:
        return ray.get([a.digest.remote() for a in self.actors])

    def save(self, ckpt_root: str, round_idx: int) -> None:
        ray.get([a.save.remote(ckpt_root, round_idx) for a in self.actors])

    def publish_weights(self, export_dir: Optional[str], bucket_bytes: int) -> List[ray.ObjectRef]:
        """Export (if ``export_dir``) and return rank 0's weight buckets in the object store."""
        return self.wait([a.publish_weights.remote(export_dir, bucket_bytes) for a in self.actors], "weight export")[0]

    def put_weights(self, bucket_bytes: int) -> List[ray.ObjectRef]:
        """Rank 0's weight buckets in the object store; the ranks keep the weights for ``export_put_weights``."""
        return self.wait([a.put_weights.remote(bucket_bytes) for a in self.actors], "weight export")[0]

    def export_put_weights_async(self, export_dir: Optional[str]) -> List[ray.ObjectRef]:
        """Start exporting the weights ``put_weights`` gathered (``wait(refs, "weight export")`` waits)."""
        return [a.export_put_weights.remote(export_dir) for a in self.actors]

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
