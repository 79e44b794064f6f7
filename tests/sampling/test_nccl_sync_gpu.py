"""``NcclSync`` (refine/sync.py): a learner's weights broadcast over NCCL into a vLLM sampler actor
(two GPUs, vLLM, Ray; skipped elsewhere).

NCCL cannot put two ranks on one GPU, so the learner and the sampler each take one. The learner is a
stand-in for rank 0 of a DeepSpeed group (a state dict and the four methods ``NcclSync`` calls on it):
a ZeRO-3 learner needs DeepSpeed, which the GPU machine does not have; ``Learner``'s own methods are
the same calls on the gathered state.
"""
import pytest
import torch

from selfrefine_dist.config.schema import SamplerConfig
from selfrefine_dist.sampling.weights import bucket_metas, expected_checksums, named_tensor_buckets
from sampling_helpers import make_requests, perturbed_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


class LearnerRankZero:
    """Stands in for learner rank 0: holds a state dict and sends it bucket by bucket."""

    def __init__(self, state_dict):
        self.state_dict = state_dict

    def set_state(self, state_dict):  # what a DPO round does to the weights
        self.state_dict = state_dict

    def address(self):
        import ray

        from selfrefine_dist.train.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join_weight_broadcast(self, master_address, master_port, world_size):
        from selfrefine_dist.sampling.nccl_sync import NcclWeightSender

        self.sender = NcclWeightSender(master_address, master_port, world_size)

    def gather_for_broadcast(self, export_dir, bucket_bytes):
        self.buckets = list(named_tensor_buckets(((k, v.cuda()) for k, v in self.state_dict.items()), bucket_bytes))
        return [bucket_metas(bucket) for bucket in self.buckets]

    def send_bucket(self, index):
        self.sender.send(self.buckets[index])


class OneRankGroup:
    """What NcclSync needs of a LearnerGroup: its actors and ``wait``."""

    def __init__(self, actor):
        self.actors = [actor]

    def wait(self, refs, during):
        import ray

        return ray.get(list(refs))


def test_broadcast_reaches_every_vllm_worker_bit_for_bit(tiny_model_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: NCCL ranks cannot share one")
    pytest.importorskip("vllm")
    ray = pytest.importorskip("ray")
    from selfrefine_dist.refine.sync import NcclSync
    from selfrefine_dist.sampling.pool import SamplerPool
    from selfrefine_dist.sampling.records import SamplingSettings

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = SamplerConfig(backend="vllm", num_actors=1, chunk_size=4, cpus_per_actor=1, gpus_per_actor=1,
                            max_model_len=512, gpu_memory_utilization=0.3)
        pool = SamplerPool(cfg, str(tiny_model_dir), "fp32")
        learners = OneRankGroup(ray.remote(num_gpus=1)(LearnerRankZero).remote(perturbed_state_dict(tiny_model_dir, 1)))
        sync = NcclSync(bucket_bytes=64 * 1024)  # several buckets
        for version in (1, 2):  # the second push reuses the NCCL group the first one set up
            state_dict = perturbed_state_dict(tiny_model_dir, seed=version)
            ray.get(learners.actors[0].set_state.remote(state_dict))
            timing = sync.push(learners, pool, None, version=version)
            assert timing.export_s >= 0 and timing.transfer_s > 0 and sync.joined == (id(learners), (0,))
            assert pool.versions() == [version] and pool.version == version
            assert pool.checksums() == [expected_checksums(state_dict, "vllm", "fp32", tie_word_embeddings=True)]
        requests = make_requests(tiny_model_dir, 3)
        results = pool.generate(requests, SamplingSettings(1.0, 1.0, 8, seed=0), progress=False)
        assert sorted(results) == sorted(r.key for r in requests)
    finally:
        ray.shutdown()
