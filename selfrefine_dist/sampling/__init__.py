"""Sampling K reasoning paths per question on sampler actors (vLLM or transformers), with weight sync.

    records.py       GenerationRequest, GeneratedText, SamplingSettings, SamplingStats, work_item_seed
    backend.py       the SamplerBackend interface, BackendSpec, make_backend
    hf_backend.py    HFBackend: transformers generate (reference)
    vllm_backend.py  VLLMBackend: vLLM in-process; vllm_worker.py runs inside its worker
    actor.py         SamplerActor: a backend in a Ray actor, with its weights version
    pool.py          SamplerPool: work queue over actors, restart recovery, weight updates
    weights.py       buckets of named tensors, flattening, expected checksums (pure)
    nccl_sync.py     GPU: NCCL broadcast from learner rank 0 to the vLLM workers

Only records and weights are imported here; ray and vllm load with the modules that need them.
"""
from selfrefine_dist.sampling.records import (GeneratedText, GenerationRequest, SamplingSettings, SamplingStats,
                                              work_item_seed)
from selfrefine_dist.sampling.weights import expected_checksums, named_tensor_buckets, tensor_sha256

__all__ = ["GeneratedText", "GenerationRequest", "SamplingSettings", "SamplingStats", "work_item_seed",
           "expected_checksums", "named_tensor_buckets", "tensor_sha256"]
