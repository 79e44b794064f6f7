"""Which weight sync a config gets (refine.weight_sync); the syncs themselves run in test_learner_group.py
(object store, CPU) and tests/sampling/test_nccl_sync_gpu.py (NCCL, two GPUs)."""
import pytest

from selfrefine_dist.config import load_config
from selfrefine_dist.refine.sync import NcclSync, ObjectStoreSync, make_weight_sync


@pytest.mark.parametrize("overrides, kind", [
    ([], ObjectStoreSync),  # CPU learners and samplers
    (["refine.gpus_per_learner=1", "sampler.gpus_per_actor=1"], NcclSync),
    (["refine.gpus_per_learner=1", "sampler.gpus_per_actor=1", "sampler.backend=hf"], ObjectStoreSync),
    (["refine.gpus_per_learner=1"], ObjectStoreSync),  # samplers on CPU: nothing to broadcast to over NCCL
    (["refine.weight_sync=nccl"], NcclSync),
    (["refine.gpus_per_learner=1", "sampler.gpus_per_actor=1", "refine.weight_sync=object_store"], ObjectStoreSync),
])
def test_auto_picks_nccl_only_where_learners_and_vllm_samplers_hold_gpus(overrides, kind):
    sync = make_weight_sync(load_config(None, ["refine.sync_bucket_mb=2", *overrides]))
    assert type(sync) is kind and sync.bucket_bytes == 2 << 20
