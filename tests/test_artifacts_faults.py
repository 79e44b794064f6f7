"""A full or read-only run directory during an artifact or ledger write: a clear error naming the file,
nothing partial left, the previous file intact, and the stage resumes once there is space again.

Two ways to make the disk fail:
- a real 256 KiB tmpfs, filled up or remounted read-only (needs root and mount rights; skipped where the
  sandbox refuses mount). Running as root, chmod does not stop writes, so it cannot stand in for this.
- monkeypatched file writes / fsync / rename that raise ENOSPC at the Nth call: the only way to make a
  disk full where mount is refused, and the way to fail at an exact point (the rename, the fsync).
"""
import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from selfrefine_dist import artifacts
from selfrefine_dist.artifacts import ArtifactWriteError, read_json, read_jsonl, write_json, write_jsonl
from selfrefine_dist.stages import Stage, StageLedger

ROWS = [{"uid": f"q{i}", "text": "x" * 200, "reward": i % 2} for i in range(40)]  # about 10 KB


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs at tmp_path/disk; yields (mount point, fill(), free(), read_only(flag))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}); the monkeypatched tests cover this")
    filler = mnt / "filler"

    def fill():
        with filler.open("ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 1024)
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def free():
        filler.unlink()

    def read_only(flag: bool):
        subprocess.run(["mount", "-o", f"remount,{'ro' if flag else 'rw'}", str(mnt)], check=True)

    try:
        yield mnt, fill, free, read_only
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_full_disk_leaves_the_old_file_and_no_partial_file(small_disk):
    mnt, fill, free, _ = small_disk
    path = mnt / "rounds" / "round_01" / "samples.jsonl"
    write_jsonl(path, ROWS[:3])
    before = path.read_bytes()
    fill()
    with pytest.raises(ArtifactWriteError) as e:
        write_jsonl(path, ROWS)
    message = str(e.value)
    assert f"could not write {path}: No space left on device (ENOSPC); the file is left as it was" in message
    assert "run the same command again" in message and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and leftovers(path.parent) == []
    free()  # space is back: the same write goes through
    write_jsonl(path, ROWS)
    assert read_jsonl(path) == ROWS and leftovers(path.parent) == []


def test_read_only_disk_leaves_the_old_file(small_disk):
    mnt, _, _, read_only = small_disk
    path = mnt / "summary.json"
    write_json(path, {"round": 1})
    read_only(True)
    with pytest.raises(ArtifactWriteError, match=rf"could not write {path}: Read-only file system \(EROFS\); "
                                                 r"the file is left as it was"):
        write_json(path, {"round": 1, "more": 2})
    with pytest.raises(ArtifactWriteError, match=r"new\.json: Read-only file system \(EROFS\); the file is not created"):
        write_json(mnt / "new.json", {})
    assert read_json(path) == {"round": 1} and leftovers(mnt) == []
    read_only(False)
    write_json(path, {"round": 1, "more": 2})
    assert read_json(path) == {"round": 1, "more": 2}


def test_a_stage_cut_off_by_a_full_disk_resumes_once_there_is_space(small_disk):
    """The driver's order: ledger 'started', the artifacts, ledger 'done'. A full disk at any of these
    leaves a ledger that a rerun reads, and the rerun redoes the stage from what is on disk."""
    mnt, fill, free, _ = small_disk
    run_dir = mnt / "run"
    stage = Stage("round_01/pairs", {"k": 1}, ("rounds/round_01/pair_report.json", "rounds/round_01/pairs.jsonl"))
    ledger = StageLedger(run_dir, say=lambda msg: None)
    assert ledger.prepare(stage) == "run"
    ledger.started(stage)
    write_json(run_dir / stage.artifacts[0], {"pairs_kept": len(ROWS)})
    fill()
    with pytest.raises(ArtifactWriteError, match="pairs.jsonl: No space left on device"):
        write_jsonl(run_dir / stage.artifacts[1], ROWS)
    with pytest.raises(ArtifactWriteError, match=rf"could not write {run_dir / 'stages.json'}: No space left"):
        ledger.finished(stage)  # the ledger itself cannot be written either
    ledger_on_disk = json.loads((run_dir / "stages.json").read_text())
    assert ledger_on_disk["round_01/pairs"]["status"] == "started"  # the last write that made it, whole
    assert not (run_dir / stage.artifacts[1]).exists() and leftovers(run_dir) == []
    free()
    rerun = StageLedger(run_dir, say=lambda msg: None)
    assert rerun.prepare(stage) == "resume"
    write_jsonl(run_dir / stage.artifacts[1], ROWS)
    rerun.finished(stage)
    assert StageLedger(run_dir, say=lambda msg: None).is_done(stage)
    assert read_jsonl(run_dir / stage.artifacts[1]) == ROWS


# ---- monkeypatched faults: these run everywhere --------------------------------------------------


class FailingFile:
    """A file whose ``fail_at``-th write raises ENOSPC after writing half of it (a disk filling up)."""

    def __init__(self, f, counter, fail_at):
        self._f, self._counter, self._fail_at = f, counter, fail_at

    def write(self, text):
        self._counter[0] += 1
        if self._counter[0] == self._fail_at:
            self._f.write(text[: len(text) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(text)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("fail_at", [1, 5, 40])
def test_enospc_at_the_nth_write_leaves_the_old_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, ROWS[:2])
    before = path.read_bytes()
    counter, real_open = [0], Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FailingFile(real_open(self, *a, **k), counter, fail_at))
    with pytest.raises(ArtifactWriteError, match=rf"could not write {path}: No space left on device \(ENOSPC\)"):
        write_jsonl(path, ROWS)
    assert counter[0] == fail_at
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("point", ["fsync", "replace"])
def test_enospc_at_flush_or_rename_leaves_the_old_file(tmp_path, monkeypatch, point):
    """Delayed allocation: a full disk may only show at fsync; a rename can fail too (EROFS, EXDEV, ...)."""
    path = tmp_path / "summary.json"
    write_json(path, {"old": True})

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, point, fail)
    with pytest.raises(ArtifactWriteError, match=rf"{path}: No space left on device"):
        write_json(path, {"old": False})
    monkeypatch.undo()
    assert read_json(path) == {"old": True} and leftovers(tmp_path) == []


def test_the_ledger_write_fails_whole_and_names_the_ledger(tmp_path, monkeypatch):
    stage = Stage("sft", {"lr": 1}, ("sft/model",))
    ledger = StageLedger(tmp_path, say=lambda msg: None)
    ledger.started(stage)
    before = (tmp_path / "stages.json").read_bytes()
    monkeypatch.setattr(artifacts.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(ArtifactWriteError, match=rf"could not write {tmp_path / 'stages.json'}: Read-only file system"):
        ledger.finished(stage)
    monkeypatch.undo()
    assert (tmp_path / "stages.json").read_bytes() == before and leftovers(tmp_path) == []
    assert StageLedger(tmp_path, say=lambda msg: None).prepare(stage) == "resume"


def test_a_row_that_is_not_json_leaves_no_partial_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, ROWS[:1])
    with pytest.raises(TypeError):
        write_jsonl(path, [ROWS[0], {"bad": uuid.uuid4()}])
    assert read_jsonl(path) == ROWS[:1] and leftovers(tmp_path) == []
