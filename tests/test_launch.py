"""launch.py: DeepSpeed's op folder is the Python environment's own, and the Makefile names the same one."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfrefine_dist import launch

REPO = Path(__file__).resolve().parents[1]


def test_each_environment_builds_its_ops_in_its_own_folder(monkeypatch):
    here = launch.torch_extensions_dir()
    assert Path(here).parent == Path.home() / ".cache" / "selfrefine" / "torch_extensions"
    assert Path(here).name == hashlib.md5(sys.prefix.encode()).hexdigest()[:12]
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")
    assert launch.torch_extensions_dir() != here  # another venv: another folder, no rebuilds of each other's ops


def test_learners_get_the_folder_unless_the_user_named_one(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert launch.learner_env(1)["TORCH_EXTENSIONS_DIR"] == launch.torch_extensions_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    assert launch.learner_env(1)["TORCH_EXTENSIONS_DIR"] == "/mine"


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("md5sum") is None, reason="needs make and md5sum")
def test_the_makefile_names_the_same_folder_as_the_package():
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "MAKEFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "print-ops-dir: ; @echo $(TORCH_EXTENSIONS_DIR)",
                          "print-ops-dir", f"VENV={sys.prefix}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == launch.torch_extensions_dir()
