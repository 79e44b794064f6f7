"""Fingerprinted stages: reuse what a config change does not touch, recompute what it does.

Every stage of a run (SFT, an evaluation, a round's samples, pairs and DPO) is described by a
``Stage``: its name, the artifacts it writes (paths relative to the run directory) and its
``inputs``, the config values and upstream stage fingerprints it depends on. The fingerprint is
a hash of the inputs. ``<run>/stages.json`` (the ledger) records, per stage, the fingerprint and
inputs it was computed with and whether it finished. Before a stage runs, ``StageLedger.prepare``
decides, and says on the console:

    reuse    finished here with the same fingerprint (or linked from ``run.reuse_from``, where a
             sibling run finished a stage with the same fingerprint: one SFT for a whole sweep);
    resume   started here with the same fingerprint and cut off: the stage continues its own way
             (SFT from its newest checkpoint, a round from its last finished artifact);
    run      new, or stale: the recorded fingerprint differs (the keys that changed are printed)
             or nothing was recorded. Stale artifacts are moved to ``<run>/stale/<time>/``, never
             reused and never deleted.

A downstream stage's inputs hold its upstream stages' fingerprints, so a change propagates: a new
SFT makes every evaluation and round stale, a new round 1 makes round 2 stale, and so on.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

LEDGER = "stages.json"


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """12 hex digits of sha256 over the inputs as canonical JSON (sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Stage:
    """One unit of work. name: "sft", "eval/sft", "round_01/samples", ...; artifacts: relative paths."""

    name: str
    inputs: Mapping[str, Any]
    artifacts: Tuple[str, ...]
    # Linked along with the artifacts when present, not needed for reuse (e.g. a learner checkpoint).
    extras: Tuple[str, ...] = field(default=())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ, with old -> new: ``["dpo.lr: 5e-06 -> 1e-06"]``."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_keys(a, b, name + ".")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."


class StageLedger:
    """The record of a run directory's stages; see the module docstring."""

    def __init__(self, run_dir: Path, reuse_from: Optional[str] = None, say: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.reuse_from = Path(reuse_from) if reuse_from else None
        self.say = say
        self.path = self.run_dir / LEDGER
        self.entries: Dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.decisions: Dict[str, str] = {}  # stage name -> reuse | resume | run, this driver run

    # ---- decisions ------------------------------------------------------------------------
    def prepare(self, stage: Stage) -> str:
        """Decide how ``stage`` is done this time: "reuse", "resume" or "run" (see the module docstring)."""
        decision = self._decide(stage)
        self.decisions[stage.name] = decision
        return decision

    def is_done(self, stage: Stage) -> bool:
        """True when ``stage`` finished with this fingerprint and its artifacts are all there."""
        entry = self.entries.get(stage.name)
        return bool(entry and entry["fingerprint"] == stage.fingerprint and entry["status"] == "done"
                    and self._present(self.run_dir, stage.artifacts))

    def _decide(self, stage: Stage) -> str:
        fp, entry = stage.fingerprint, self.entries.get(stage.name)
        if entry is not None and entry["fingerprint"] == fp:
            if entry["status"] == "done" and self._present(self.run_dir, stage.artifacts):
                self.say(f"stage {stage.name}: reused ({fp})")
                return "reuse"
            if entry["status"] == "started":
                self.say(f"stage {stage.name}: resuming ({fp}, cut off earlier)")
                return "resume"
            why = "artifacts missing"
        elif entry is not None:
            diff = changed_keys(entry.get("inputs", {}), dict(stage.inputs))
            why = "; ".join(diff) or "fingerprint changed"
        elif any(self._exists(self.run_dir / a) for a in stage.artifacts):
            why = "no fingerprint recorded for its artifacts (an older version wrote them)"
        else:
            why = ""
        self._move_stale(stage)
        if self._link(stage):
            return "reuse"
        self.say(f"stage {stage.name}: computing ({fp})" + (f", stale: {why}" if why else ""))
        return "run"

    # ---- bookkeeping ----------------------------------------------------------------------
    def started(self, stage: Stage) -> None:
        self._record(stage, "started")

    def finished(self, stage: Stage, **extra: Any) -> None:
        self._record(stage, "done", **extra)

    def _record(self, stage: Stage, status: str, **extra: Any) -> None:
        self.entries[stage.name] = {"fingerprint": stage.fingerprint, "status": status, "time": time.time(),
                                    "inputs": json.loads(json.dumps(dict(stage.inputs), default=str)), **extra}
        self._write()

    def _write(self) -> None:
        """Whole or not at all; a full or read-only disk raises ArtifactWriteError naming the ledger, the
        ledger on disk as it was (its stages then run again or resume on the next run)."""
        from selfrefine_dist.artifacts import write_json

        write_json(self.path, self.entries, indent=1, sort_keys=True)

    # ---- stale artifacts and links --------------------------------------------------------
    @staticmethod
    def _exists(path: Path) -> bool:
        return path.exists() or path.is_symlink()

    @staticmethod
    def _present(root: Path, artifacts: Tuple[str, ...]) -> bool:
        return all((root / a).exists() for a in artifacts)

    def _move_stale(self, stage: Stage) -> None:
        """Move the stage's artifacts (and extras) aside: ``<run>/stale/<time>/<path>``; nothing is deleted."""
        moved = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for rel in stage.artifacts + stage.extras:
            src = self.run_dir / rel
            if self._exists(src):
                dst = self.run_dir / "stale" / stamp / rel
                if self._exists(dst):  # two stale moves in one second
                    dst = dst.with_name(f"{dst.name}.{time.time_ns()}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                moved.append(rel)
        if stage.name in self.entries:
            del self.entries[stage.name]
            self._write()
        if moved:
            self.say(f"stage {stage.name}: moved stale {', '.join(moved)} to {self.run_dir / 'stale' / stamp}")

    def _link(self, stage: Stage) -> bool:
        """Symlink a sibling run's finished stage with the same fingerprint (``run.reuse_from``)."""
        if self.reuse_from is None or not self.reuse_from.is_dir():
            return False
        fp = stage.fingerprint
        for ledger in sorted(self.reuse_from.glob(f"*/{LEDGER}")):
            other = ledger.parent
            if other.resolve() == self.run_dir.resolve():
                continue
            try:
                entry = json.loads(ledger.read_text()).get(stage.name)
            except (OSError, json.JSONDecodeError):
                continue
            if not entry or entry["fingerprint"] != fp or entry["status"] != "done":
                continue
            if not self._present(other, stage.artifacts):
                continue
            for rel in stage.artifacts + tuple(e for e in stage.extras if (other / e).exists()):
                dst = self.run_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink((other / rel).resolve(), dst)
            self._record(stage, "done", linked_from=str(other))
            self.say(f"stage {stage.name}: reused ({fp}), linked from {other}")
            return True
        return False
