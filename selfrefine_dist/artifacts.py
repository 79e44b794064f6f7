"""A run's artifacts on disk: written whole or not at all, so a file that exists is a finished stage.

    <run>/rounds/round_01/samples.jsonl   every sampled path with its reward and model version
    <run>/rounds/round_01/sample_report.json  pass rate, pass@K, tokens/s of that sampling
    <run>/rounds/round_01/pairs.jsonl     the preference pairs built from them
    <run>/rounds/round_01/model/          the policy after the round (Hugging Face folder)
    <run>/rounds/round_01/summary.json    the round's metrics; written last: the round is done

A write goes to ``<name>.tmp`` beside the file, is flushed to disk, then renamed over it. A full or
read-only disk raises ``ArtifactWriteError`` naming the file; the temporary file is removed and the
previous version of the file, if any, is left as it was, so the same command resumes once there is
space again.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable, Iterable, List, TextIO


def round_dir(run_dir: Path, round_idx: int) -> Path:
    return Path(run_dir) / "rounds" / f"round_{round_idx:02d}"


class ArtifactWriteError(OSError):
    """A run artifact could not be written (disk full, read-only, ...); the file named is unchanged."""


def write_whole(path: Path, write: Callable[[TextIO], None]) -> None:
    """``write(f)`` into a temporary file, flushed to disk, then renamed to ``path``: readers never see
    half a file, and a failure leaves the previous ``path`` as it was (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only show when the data reaches it: before the rename
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only directory: nothing was created there either
        if not isinstance(e, OSError):
            raise  # a row that is not JSON, an interrupt: no partial file left either
        previous = "left as it was" if path.exists() else "not created"
        raise ArtifactWriteError(e.errno, f"could not write {path}: {e.strerror or e} "
                                          f"({errno.errorcode.get(e.errno, 'error')}); the file is {previous}. "
                                          f"Free space or make {path.parent} writable, then run the same command "
                                          f"again: it resumes from the last finished artifact") from e


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written whole (``write_whole``)."""
    def write(f: TextIO) -> None:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    write_whole(path, write)


def read_jsonl(path: Path) -> List[dict]:
    rows = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return rows


def write_json(path: Path, obj, indent: int = 2, sort_keys: bool = False) -> None:
    """``obj`` as JSON, written whole (``write_whole``)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys)  # not serialisable: fails before the disk is touched
    write_whole(path, lambda f: f.write(text))


def read_json(path: Path):
    return json.loads(Path(path).read_text())
