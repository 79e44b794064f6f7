"""Weights into the sampler pool from an exported Hugging Face folder (restarts, base/SFT evaluation).

The learners' own path (``DPOLearner.publish_weights``) gathers ZeRO-3 weights in memory;
this one reads a folder's safetensors files, and both send the same buckets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import ray
import torch


def read_folder_state(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights to load into the samplers")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_folder_into_pool(pool, folder: str, version: int, bucket_bytes: int) -> float:
    """Send ``folder``'s weights to every sampler as ``version``; returns the seconds it took."""
    from selfrefine_dist.sampling.weights import named_tensor_buckets

    state = read_folder_state(folder)
    refs = [ray.put(bucket) for bucket in named_tensor_buckets(state.items(), bucket_bytes)]
    return pool.update_weights(refs, version=version)
