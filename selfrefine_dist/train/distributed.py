"""Process-group set-up shared by every learner: gloo on CPU, NCCL on GPU.

Under torchrun or the ``deepspeed`` launcher the environment already names
RANK/WORLD_SIZE/MASTER_ADDR; a plain single process gets rank 0 of 1.
"""
from __future__ import annotations

import os
import socket

import torch

from selfrefine_dist.train.memory import bound_cpu_kernel_caches, set_cpu_memory


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", cpu_memory: str = "lean") -> None:
    """Initialise torch.distributed through DeepSpeed, once; on CPU, apply ``distributed.cpu_memory``
    (``train/memory.py``) and bound the kernel caches."""
    import deepspeed

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` process: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend=resolve_backend(backend), auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    else:  # weights, gradients and optimizer state live in host memory: give back what is freed
        set_cpu_memory(cpu_memory)
        bound_cpu_kernel_caches()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce(value: float | int, device: torch.device, op) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    return _all_reduce(value, device, torch.distributed.ReduceOp.SUM)


def all_reduce_max(value: float | int, device: torch.device) -> float:
    return _all_reduce(value, device, torch.distributed.ReduceOp.MAX)


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
