"""Weight sync into the samplers: buckets of named tensors, flattening, checksums.

The learner gathers its full state dict (Hugging Face names), cuts it into
buckets with ``named_tensor_buckets`` and ``ray.put``s each bucket; every
sampler loads every bucket (``SamplerPool.update_weights``). On GPUs the same
buckets travel flattened over NCCL instead (``nccl_sync``).

Checksums are sha256 digests of a parameter's bytes in the sampler's dtype.
``expected_checksums`` computes, from the state dict the learner sent, the
digests a sampler must report afterwards, so a test (or the driver) can check
that the weights arrived bit for bit. vLLM fuses some projections into one
parameter (see ``LLAMA_PACKED_MODULES``); their digest is that of the
concatenation along dim 0, in the mapping's order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import torch

NamedTensor = Tuple[str, torch.Tensor]

# vLLM's packed_modules_mapping of LlamaForCausalLM (Qwen2, Mistral and others use the same).
LLAMA_PACKED_MODULES: Dict[str, List[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}

# Offsets in a flattened bucket are multiples of this, so every tensor view is aligned for its dtype.
FLAT_ALIGN_BYTES = 64

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def named_tensor_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[List[NamedTensor]]:
    """Group tensors, in order, into lists of at most ``bucket_bytes`` bytes.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Tensors are
    yielded as given (no copy, no device move).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: List[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lies in a flattened bucket: bytes [offset, offset + nbytes)."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


def bucket_metas(bucket: Sequence[NamedTensor]) -> List[TensorMeta]:
    """The layout ``flatten_bucket`` gives ``bucket``, computable without its data."""
    metas, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        metas.append(TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // FLAT_ALIGN_BYTES) * FLAT_ALIGN_BYTES
    return metas


def flat_size(metas: Sequence[TensorMeta]) -> int:
    """Bytes of the flattened bucket (the last tensor's end)."""
    return metas[-1].offset + metas[-1].nbytes if metas else 0


def flatten_bucket(bucket: Sequence[NamedTensor]) -> Tuple[torch.Tensor, List[TensorMeta]]:
    """Concatenate a bucket's bytes into one uint8 tensor [flat_size] on the tensors' device (aligned offsets)."""
    metas = bucket_metas(bucket)
    device = bucket[0][1].device if bucket else torch.device("cpu")
    flat = torch.zeros(flat_size(metas), dtype=torch.uint8, device=device)
    for meta, (_, tensor) in zip(metas, bucket):
        flat[meta.offset : meta.offset + meta.nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, metas


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> List[NamedTensor]:
    """Views of ``flat`` (uint8 [flat_size]) as the bucket's named tensors."""
    return [(m.name, flat[m.offset : m.offset + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape)) for m in metas]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (C order), any dtype, any device."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()


def expected_checksums(
    state_dict: Mapping[str, torch.Tensor],
    backend: str,
    dtype: str,
    tie_word_embeddings: bool,
    packed_modules: Mapping[str, Sequence[str]] = LLAMA_PACKED_MODULES,
) -> Dict[str, str]:
    """The digests a sampler of ``backend`` ("hf" or "vllm") reports once it holds ``state_dict``.

    ``state_dict`` uses Hugging Face names; a tied ``lm_head.weight`` (present
    or not) is left out, as both backends hold it once, as the embedding. For
    vLLM, the members of each packed module are concatenated (dim 0) into it.
    Tensor-parallel shards are not modelled: this is the TP=1 layout.
    """
    cast = {name: t.detach().to(DTYPES[dtype]) for name, t in state_dict.items()
            if not (tie_word_embeddings and name == "lm_head.weight")}
    if backend == "hf":
        return {name: tensor_sha256(t) for name, t in cast.items()}
    if backend != "vllm":
        raise ValueError(f"unknown backend {backend!r}")
    member_of = {member: (packed, i) for packed, members in packed_modules.items() for i, member in enumerate(members)}
    out: Dict[str, str] = {}
    groups: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    for name, tensor in cast.items():
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if module in member_of:
            packed, index = member_of[module]
            packed_name = ".".join(parts[:-2] + [packed, parts[-1]])
            groups.setdefault(packed_name, []).append((index, tensor))
        else:
            out[name] = tensor_sha256(tensor)
    for packed_name, members in groups.items():
        expected = len(packed_modules[packed_name.split(".")[-2]])
        if len(members) != expected:
            raise ValueError(f"{packed_name}: {len(members)} of {expected} packed members in the state dict")
        out[packed_name] = tensor_sha256(torch.cat([t for _, t in sorted(members, key=lambda m: m[0])], dim=0))
    return out
