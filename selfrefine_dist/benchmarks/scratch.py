"""The folder a benchmark writes its models, checkpoints and runs into: removed when the benchmark
exits (a DPO or SFT comparison leaves 2-6 GB there), kept with ``--keep-work``."""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path


def scratch_dir(prefix: str, keep: bool) -> Path:
    """A new folder under the system's temporary directory; removed at interpreter exit (normal end or an
    exception) unless ``keep``, in which case its path is printed then."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(_at_exit, path, keep)
    return path


def _at_exit(path: Path, keep: bool) -> None:
    if keep:
        print(f"work files kept in {path}", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)
