"""NCCL weight broadcast from a learner process into a vLLM sampler actor (two GPUs, vLLM, Ray).

NCCL cannot put two ranks on one GPU, so the learner and the sampler each take one.
"""
import socket

import pytest
import torch

from selfrefine_dist.config.schema import SamplerConfig
from selfrefine_dist.sampling.weights import bucket_metas, expected_checksums, named_tensor_buckets
from sampling_helpers import make_requests, perturbed_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


class LearnerRankZero:
    """Stands in for learner rank 0: holds a state dict and sends it bucket by bucket."""

    def __init__(self, state_dict, bucket_bytes):
        self.buckets = list(named_tensor_buckets(((k, v.cuda()) for k, v in state_dict.items()), bucket_bytes))

    def metas(self):
        return [bucket_metas(bucket) for bucket in self.buckets]

    def join(self, master_address, master_port, world_size):
        from selfrefine_dist.sampling.nccl_sync import NcclWeightSender

        self.sender = NcclWeightSender(master_address, master_port, world_size)

    def send(self, index):
        self.sender.send(self.buckets[index])


def test_broadcast_reaches_every_vllm_worker_bit_for_bit(tiny_model_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: NCCL ranks cannot share one")
    pytest.importorskip("vllm")
    ray = pytest.importorskip("ray")
    from selfrefine_dist.sampling.pool import SamplerPool
    from selfrefine_dist.sampling.records import SamplingSettings

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = SamplerConfig(backend="vllm", num_actors=1, chunk_size=4, cpus_per_actor=1, gpus_per_actor=1,
                            max_model_len=512, gpu_memory_utilization=0.3)
        pool = SamplerPool(cfg, str(tiny_model_dir), "fp32")
        state_dict = perturbed_state_dict(tiny_model_dir, seed=1)
        learner = ray.remote(num_gpus=1)(LearnerRankZero).remote(state_dict, 64 * 1024)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        address = ray.util.get_node_ip_address()

        world_size, joined = pool.init_weight_broadcast(address, port)
        ray.get(learner.join.remote(address, port, world_size))
        ray.get(joined)
        pool.begin_weight_broadcast()
        metas = ray.get(learner.metas.remote())
        assert len(metas) > 1  # several buckets
        for index, bucket_meta in enumerate(metas):
            received = pool.receive_weight_broadcast(bucket_meta)
            ray.get(learner.send.remote(index))
            ray.get(received)
        pool.finish_weight_broadcast(version=1)

        assert pool.versions() == [1]
        assert pool.checksums() == [expected_checksums(state_dict, "vllm", "fp32", tie_word_embeddings=True)]
        requests = make_requests(tiny_model_dir, 3)
        results = pool.generate(requests, SamplingSettings(1.0, 1.0, 8, seed=0), progress=False)
        assert sorted(results) == sorted(r.key for r in requests)
    finally:
        ray.shutdown()
