"""The top-level kernels/ folder must not pose as Hugging Face's `kernels` package."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_inert_as_a_top_level_import():
    # Run from the checkout's root, where `python -m` puts kernels/ on sys.path as `kernels`.
    code = ("import kernels, transformers.utils.import_utils as u; from transformers import LlamaConfig; "
            "print(hasattr(kernels, 'token_logprobs'), u.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", "False"]
