"""Test-wide environment: offline; without a CUDA device, Triton under its interpreter.

TRITON_INTERPRET must be set before anything imports triton, so it is decided here, at the
top of the first file pytest loads. Importing torch to ask for a device does not import
triton (torch loads it lazily). With a CUDA device the variable stays unset, so that the
``gpu`` tests run the compiled kernels; set TRITON_INTERPRET=1 yourself to interpret there.
"""
import os
import sys


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:  # the pure modules' tests (rewards, config) run without torch
        return False
    return torch.cuda.is_available()


if not _cuda_present():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1; "
                           "set it in the environment")
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Under pytest-xdist (``make test`` runs two workers) each worker gets its own Ray temp dir: a bare
# ``ray.init()`` joins the cluster named in the temp dir's ``ray_current_cluster`` file, and must never
# find another worker's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/ray_{os.environ['PYTEST_XDIST_WORKER']}")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is present")
    config.addinivalue_line("markers", "slow: multi-process or model-loading test (seconds to a minute)")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
    except ImportError:  # the pure modules' tests (rewards, config) run without torch
        torch = None
    if torch is not None and torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 64) with a BPE tokenizer trained on GSM8K text."""
    from selfrefine_dist.data.sources import load_examples
    from selfrefine_dist.models.tiny import build_tiny_llama

    corpus = [f"{ex.question}\n{ex.rationale}\nThe answer is {ex.answer}." for ex in
              load_examples("gsm8k", "offline", "test", limit=300)]
    corpus += [f"{ex.question} {' '.join(ex.choices)}" for ex in load_examples("csqa", "offline", "validation", limit=200)]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), corpus, seed=0)
