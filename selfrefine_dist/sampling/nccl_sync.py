"""GPU weight sync: learner rank 0 broadcasts flattened buckets over NCCL to every vLLM worker.

CUDA only (it cannot run on CPU); importable anywhere, as vLLM is imported inside
the functions. The group is vLLM's ``StatelessProcessGroup`` (a TCP-store
rendezvous that leaves torch.distributed's default group alone, so it does not
clash with the learner's DeepSpeed group) plus a ``PyNcclCommunicator``:
rank 0 is the learner, then the vLLM workers, ``tensor_parallel_size`` per
sampler actor. NCCL needs one GPU per rank: the learner and the samplers must
not share a GPU (a colocated setup would use CUDA IPC instead).

The sequence (``refine/sync.py``'s ``NcclSync`` runs it; ``SamplerActor.weight_broadcast`` is the
actors' end):

    once:  every sampler actor: weight_broadcast("init", address, port, rank_offset, world_size)
           learner rank 0:      sender = NcclWeightSender(address, port, world_size)
    each sync:
           every actor: weight_broadcast("begin")
           for each bucket of the gathered state dict (on learner rank 0):
               every actor: weight_broadcast("receive", bucket_metas(bucket))   # waits for it
               learner rank 0: sender.send(bucket)                             # one NCCL broadcast
           every actor: weight_broadcast("finish", version)

Only bucket metadata (names, dtypes, shapes, offsets) goes through Ray; the
bytes go through NCCL, one flat uint8 buffer per bucket.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from selfrefine_dist.sampling.weights import NamedTensor, TensorMeta, flat_size, flatten_bucket, unflatten_bucket


def join_broadcast_group(master_address: str, master_port: int, rank: int, world_size: int):
    """Join the learner-to-samplers group on the current CUDA device; returns a ``PyNcclCommunicator``.

    Blocks until all ``world_size`` ranks have joined (rank 0 hosts the TCP store).
    """
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=torch.cuda.current_device())


def broadcast_flat(communicator, flat: torch.Tensor) -> None:
    """Broadcast a uint8 buffer from rank 0 (send on rank 0, receive in place elsewhere), then wait."""
    stream = torch.cuda.current_stream()
    communicator.broadcast(flat, src=0, stream=stream)
    stream.synchronize()


def receive_bucket(communicator, metas: Sequence[TensorMeta]) -> List[NamedTensor]:
    """Receive one flattened bucket; returns views of the received buffer as named tensors."""
    flat = torch.empty(flat_size(metas), dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
    broadcast_flat(communicator, flat)
    return unflatten_bucket(flat, metas)


class NcclWeightSender:
    """Learner rank 0's end of the group: ``send(bucket)`` once per bucket, in the receivers' order."""

    def __init__(self, master_address: str, master_port: int, world_size: int):
        self.communicator = join_broadcast_group(master_address, master_port, rank=0, world_size=world_size)

    def send(self, bucket: Sequence[NamedTensor]) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        flat, _ = flatten_bucket([(name, tensor.to(device, non_blocking=True)) for name, tensor in bucket])
        broadcast_flat(self.communicator, flat)
