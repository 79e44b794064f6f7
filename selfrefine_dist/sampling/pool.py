"""``SamplerPool``: sampler actors fed from a work queue, with weight sync and restart recovery.

    pool = SamplerPool(cfg.sampler, model_path, dtype="fp32")
    texts = pool.generate(requests, settings)          # {key: [GeneratedText] * n}
    pool.update_weights(bucket_refs, version=step)     # every actor loads every bucket

Requests are cut into work items of ``chunk_size`` questions, handed to actors
as they become free. If an actor dies mid-item, Ray restarts it
(``max_restarts``); the pool sends the restarted actor the current weights
(the bucket refs of the last ``update_weights``, which it keeps alive) and puts
the item back at the head of the queue, for whichever actor is free first.
Each item's samples depend only on (settings.seed, the item's requests), so a
retried item yields what the first try would have: no question is lost,
duplicated or changed.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from selfrefine_dist.config.schema import SamplerConfig
from selfrefine_dist.sampling.actor import remote_sampler_actor
from selfrefine_dist.sampling.backend import BackendSpec
from selfrefine_dist.sampling.records import GeneratedText, GenerationRequest, SamplingSettings, SamplingStats
from selfrefine_dist.sampling.weights import TensorMeta

logger = logging.getLogger(__name__)

# RayActorError covers ActorDiedError; ActorUnavailableError is raised while an actor restarts.
ACTOR_ERRORS = (RayActorError, ActorUnavailableError)
UNAVAILABLE_RETRY_S = 0.5

# A call in flight: (actor index, work item index, or None for a recovery call).
Running = Dict[ray.ObjectRef, Tuple[int, Optional[int]]]


class SamplerPool:
    """``cfg.num_actors`` sampler actors (``cpus_per_actor`` / ``gpus_per_actor`` each), built and ready.

    ``version`` is the weights version every live actor holds (0: the checkpoint
    at ``model_path``); ``last_stats`` describes the last ``generate`` call.
    """

    def __init__(self, cfg: SamplerConfig, model_path: str, dtype: str, trust_remote_code: bool = False,
                 resources: Optional[Dict[str, float]] = None, wait_for_ready: bool = True):
        self.spec = BackendSpec(
            backend=cfg.backend, model_path=model_path, dtype=dtype, trust_remote_code=trust_remote_code,
            seed=cfg.seed, num_threads=max(1, int(cfg.cpus_per_actor)), max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_gib=cfg.kv_cache_gib, block_size=cfg.block_size, hf_batch_size=cfg.hf_batch_size,
        )
        actor_class = remote_sampler_actor(cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.max_restarts, resources)
        self.actors = [actor_class.remote(self.spec) for _ in range(cfg.num_actors)]
        self.chunk_size = cfg.chunk_size
        self.max_restarts = cfg.max_restarts
        self.version = 0  # the checkpoint at model_path
        self._bucket_refs: List[ray.ObjectRef] = []
        # False after an NCCL sync: the weights are then nowhere a restarted actor could load them from.
        self._restorable = True
        self._deaths = [0] * len(self.actors)
        self._dead: set = set()  # actors past max_restarts, no longer used
        self.last_stats: Optional[SamplingStats] = None
        self._starting = True
        if wait_for_ready:
            self.ready()

    @property
    def live_actors(self) -> List[int]:
        return [a for a in range(len(self.actors)) if a not in self._dead]

    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings,
                 progress: bool = True) -> Dict[str, List[GeneratedText]]:
        """``request.n`` completions for every request, keyed by ``request.key``; stats in ``last_stats``."""
        from tqdm import tqdm

        keys = [r.key for r in requests]
        if len(set(keys)) != len(keys):
            raise ValueError("request keys must be unique")
        items = [list(requests[i : i + self.chunk_size]) for i in range(0, len(requests), self.chunk_size)]
        pending: Deque[int] = deque(range(len(items)))
        idle: Deque[int] = deque(self.live_actors)
        running: Running = {}
        results: Dict[str, List[GeneratedText]] = {}
        retried = 0
        start = time.perf_counter()
        with tqdm(total=len(requests), desc="sample", unit="q", disable=not progress, dynamic_ncols=True) as bar:
            while pending or running:
                while pending and idle:
                    actor, item = idle.popleft(), pending.popleft()
                    running[self.actors[actor].generate.remote(items[item], settings)] = (actor, item)
                if not running:
                    raise RuntimeError(f"every sampler actor is dead; {len(pending)} work items left")
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, item = running.pop(ref)
                try:
                    outputs = ray.get(ref)
                except ACTOR_ERRORS as error:
                    if item is not None:
                        pending.appendleft(item)
                        retried += 1
                    self._recover(actor, error, running)
                    continue
                if item is not None:
                    for request, texts in zip(items[item], outputs):
                        results[request.key] = texts
                    bar.update(len(items[item]))
                idle.append(actor)
        seconds = time.perf_counter() - start
        self.last_stats = SamplingStats(
            questions=len(results), samples=sum(len(t) for t in results.values()),
            generated_tokens=sum(g.num_tokens for t in results.values() for g in t), seconds=seconds,
            retried_items=retried,
        )
        return results

    def update_weights(self, bucket_refs: Sequence[ray.ObjectRef], version: int) -> float:
        """Every live actor loads every bucket (``List[(hf_name, tensor)]``); returns the seconds taken.

        The pool keeps ``bucket_refs`` (so the buckets stay in the object store)
        to bring restarted actors up to date.
        """
        start = time.perf_counter()
        self._bucket_refs, self.version, self._restorable = list(bucket_refs), version, True
        running: Running = {self.actors[a].update_weights.remote(self._bucket_refs, version): (a, None)
                            for a in self.live_actors}
        self._wait_all(running)
        return time.perf_counter() - start

    def checksums(self) -> List[Dict[str, str]]:
        """Per live actor, sha256 per parameter as the backend holds it (see ``weights.expected_checksums``)."""
        return ray.get([self.actors[a].checksums.remote() for a in self.live_actors])

    def peak_rss_gib(self) -> float:
        """The largest peak resident memory of any live actor (with the engine processes it started), GiB.
        A figure, not a task: an actor that died or is restarting since the last work item is left out
        (its memory went with it), never waited for or failed on."""
        peaks = []
        for ref in [self.actors[a].peak_rss_gib.remote() for a in self.live_actors]:
            try:
                peaks.append(ray.get(ref))
            except (ActorUnavailableError, RayActorError):
                pass
        return max(peaks, default=0.0)

    def placement(self) -> List[Tuple[str, int]]:
        """Per live actor, (Ray node id, pid)."""
        return ray.get([self.actors[a].where.remote() for a in self.live_actors])

    def versions(self) -> List[int]:
        """Per live actor, the weights version it holds."""
        return ray.get([self.actors[a].version.remote() for a in self.live_actors])

    def on_live_actors(self, method: str, *args) -> List[ray.ObjectRef]:
        """Start actor method ``method`` on every live actor; returns the refs, in live-actor order."""
        return [getattr(self.actors[a], method).remote(*args) for a in self.live_actors]

    def broadcast_done(self, version: int) -> None:
        """Every live actor holds ``version``, received over NCCL: nowhere a restarted actor could load it
        from (it is given up instead, see ``_recover``)."""
        self._bucket_refs, self.version, self._restorable = [], version, False

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def ready(self) -> None:
        """Wait until every actor's engine is built (``wait_for_ready=False`` returns before that, so the
        caller can start other work, the learners, while the engines load); then a no-op."""
        if self._starting:
            self._wait_ready()
            self._starting = False

    # -------------------------------------------------------------------------------------

    def _wait_ready(self) -> None:
        """Wait until every actor's backend is built. An actor killed while it starts (the OOM killer
        during an engine build) is restarted by Ray and waited for again, up to ``max_restarts``; an
        actor whose constructor raised is not restarted by Ray: its error is raised here."""
        running = {actor.ready.remote(): a for a, actor in enumerate(self.actors)}
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ref)
            try:
                ray.get(ref)
                continue
            except ActorUnavailableError:
                time.sleep(UNAVAILABLE_RETRY_S)
            except RayActorError as error:
                if error.actor_init_failed:
                    self.shutdown()
                    raise  # the constructor raised (a bad model path, say): Ray does not restart it
                self._deaths[actor] += 1
                if 0 <= self.max_restarts < self._deaths[actor]:
                    self.shutdown()
                    raise RuntimeError(f"sampler actor {actor} died {self._deaths[actor]} times while starting "
                                       f"(sampler.max_restarts={self.max_restarts}): {error}") from error
                logger.warning("sampler actor %d died while starting (%s); waiting for its restart",
                               actor, str(error)[:500])
            running[self.actors[actor].ready.remote()] = actor

    def _recover(self, actor: int, error: Exception, running: Running) -> None:
        """After a failed call: queue a call that waits for the restart and loads the current weights.

        An actor that died more than ``max_restarts`` times is given up.
        """
        if not self._restorable:
            # Its weights came over NCCL: a restarted actor could not be brought up to date (nor rejoin
            # the group); run without it. NcclSync joins the live actors into a new group before its next sync.
            logger.error("sampler actor %d failed after an NCCL weight sync; giving it up: %s", actor, error)
            self._dead.add(actor)
            return
        if isinstance(error, ActorUnavailableError):
            time.sleep(UNAVAILABLE_RETRY_S)  # restarting or unreachable: ask again shortly
        else:
            self._deaths[actor] += 1
            if 0 <= self.max_restarts < self._deaths[actor]:
                logger.error("sampler actor %d died %d times; giving it up: %s", actor, self._deaths[actor], error)
                self._dead.add(actor)
                return
            logger.warning("sampler actor %d died (%s); waiting for its restart", actor, str(error)[:500])
        ref = self.actors[actor].ensure_version.remote(self._bucket_refs, self.version)
        running[ref] = (actor, None)

    def _wait_all(self, running: Running) -> None:
        """Wait for calls that carry no work item, recovering actors that fail meanwhile."""
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, _ = running.pop(ref)
            try:
                ray.get(ref)
            except ACTOR_ERRORS as error:
                self._recover(actor, error, running)
        if not self.live_actors:
            raise RuntimeError("every sampler actor is dead")
