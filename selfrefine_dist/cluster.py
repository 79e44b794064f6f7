"""Joining Ray: a local instance started by the driver, or the cluster named by ``ray.address``.

Every actor group (samplers, learners) calls ``start_ray`` before its first actor: whichever stage runs
first (a rerun may train before it samples) must not let Ray start itself with its defaults (as many
CPUs as cores), which leaves no room for the sampler actors next to the learners.
"""
from __future__ import annotations

import os

from selfrefine_dist.config import Config


def start_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        # No idle workers started ahead: they import Ray on the cores the first sampler is using (10 s of
        # a 2-core round's sampling, benchmarks/round.py); each actor starts its own worker anyway.
        ray.init(num_cpus=cfg.ray.num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True, _system_config={"prestart_worker_first_driver": False})


def placement_line(role: str, placement) -> str:
    """``placement`` ([(Ray node id, pid)] per actor) as the console names it: "rank 0: node 8a443423 pid 3075, ..."."""
    return ", ".join(f"{role} {i}: node {node[:8]} pid {pid}" for i, (node, pid) in enumerate(placement))
