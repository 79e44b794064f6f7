"""Sampling with vLLM, in the calling process (a Ray actor).

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): with one
worker, vLLM's worker is then an object of this process, so weights handed to
``collective_rpc`` are passed by reference, not serialised, and the sampler's
RNG is this process's torch RNG.

Prefix sharing: the K samples of a question are K requests on one prompt. vLLM's prefix cache
shares the prompt's full KV blocks among them, in the same step; the tokens after the last full
block run once per sample. On CPU the blocks are 32 tokens (``CPU_BLOCK_SIZE``), not vLLM's 128:
a 60-token prompt then runs once for its first 32 tokens instead of K times whole. On a 2-core
AMD EPYC (SmolLM2-135M fp32, 32 prompts of 60 tokens, K=4) the prefill took 8.5 s instead of 14.0
s, and the whole sampling of 128 tokens per path 44-47 s instead of 51-53 s.

Determinism: before each work item the prefix cache is cleared and the
sampler's RNG seeded from (seed, the item's requests). The item then runs as the
same batch, scheduled the same way, from the same state, on whatever actor.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from selfrefine_dist.sampling.records import GeneratedText, GenerationRequest, SamplingSettings, work_item_seed
from selfrefine_dist.sampling.weights import NamedTensor, TensorMeta, named_tensor_buckets

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
EXTENSION = "selfrefine_dist.sampling.vllm_worker.WeightSyncExtension"
# Tensors per collective_rpc call when loading weights (bounded by bytes, not count).
LOAD_BUCKET_BYTES = 256 * 1024**2
# KV cache block size on CPU: the smallest vLLM's CPU attention takes (a multiple of 32).
CPU_BLOCK_SIZE = 32


class VLLMBackend:
    """A vLLM ``LLM`` on the current GPU(s), or on CPU with ``kv_cache_gib`` of KV cache."""

    def __init__(self, model_path: str, dtype: str, max_model_len: int = 1024, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, kv_cache_gib: int = 1, seed: int = 0, num_threads: int = 1,
                 trust_remote_code: bool = False, block_size: Optional[int] = None):
        on_gpu = torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM's INFO lines (one per prefix-cache reset, i.e. per work item) would bury the run's own
        # progress; VLLM_LOGGING_LEVEL=INFO in the driver's environment brings them back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        kwargs = {}
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
            # In-process vLLM drops torch to one thread unless OMP_NUM_THREADS says otherwise.
            os.environ["OMP_NUM_THREADS"] = str(num_threads)
            torch.set_num_threads(num_threads)
            kwargs["enforce_eager"] = True
            block_size = CPU_BLOCK_SIZE if block_size is None else block_size
            from selfrefine_dist.sampling.vllm_worker import install_packed_weight_recorder

            install_packed_weight_recorder()
        if block_size is not None:
            kwargs["block_size"] = block_size
        from vllm import LLM

        self.llm = LLM(
            model=model_path, dtype=VLLM_DTYPES[dtype], max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size, seed=seed, trust_remote_code=trust_remote_code,
            worker_extension_cls=EXTENSION, **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def engine_settings(self) -> Dict[str, object]:
        """The engine's KV cache settings as vLLM resolved them (block size, prefix caching)."""
        cache = self.llm.llm_engine.vllm_config.cache_config
        return {"block_size": cache.block_size, "prefix_caching": bool(cache.enable_prefix_caching)}

    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings) -> List[List[GeneratedText]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM rejects n > 1 with greedy decoding: run each prompt once and repeat it.
        params = [SamplingParams(n=1 if settings.greedy else r.n, temperature=settings.temperature,
                                 top_p=1.0 if settings.greedy else settings.top_p,
                                 max_tokens=settings.max_new_tokens, skip_special_tokens=True) for r in requests]
        # Same token ids as the HF backend: the rendered prompt already holds every special token.
        prompts = [TokensPrompt(prompt_token_ids=self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
                   for r in requests]
        self.llm.reset_prefix_cache()  # a cache hit would change the item's scheduling, hence its samples
        self.llm.collective_rpc("seed_sampler_rng", args=(work_item_seed(settings.seed, requests),))
        results = self.llm.generate(prompts, params, use_tqdm=False)
        outputs = []
        for request, result in zip(requests, results):
            texts = [GeneratedText(text=o.text, num_tokens=len(o.token_ids), finish_reason=o.finish_reason or "length")
                     for o in sorted(result.outputs, key=lambda o: o.index)]
            outputs.append(texts * request.n if settings.greedy else texts)
        return outputs

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> None:
        self.begin_weight_sync()
        for bucket in named_tensor_buckets(named_tensors, LOAD_BUCKET_BYTES):
            self.llm.collective_rpc("load_weight_bucket", args=(bucket,))
        self.finish_weight_sync()

    def weight_checksums(self) -> Dict[str, str]:
        """Worker 0's digests (with tensor parallelism, its shards)."""
        return self.llm.collective_rpc("weight_checksums")[0]

    # Weight sync in steps, for the NCCL path (nccl_sync.py): begin, receive bucket after bucket, finish.

    def begin_weight_sync(self) -> None:
        self.llm.collective_rpc("begin_weight_sync")

    def finish_weight_sync(self) -> None:
        self.llm.collective_rpc("finish_weight_sync")
        self.llm.reset_prefix_cache()  # cached keys/values were computed by the old weights

    def init_weight_broadcast(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Each worker joins the learner's NCCL group as rank ``rank_offset + its rank``."""
        self.llm.collective_rpc("init_weight_broadcast", args=(master_address, master_port, rank_offset, world_size))

    def receive_weight_broadcast(self, metas: Sequence[TensorMeta]) -> None:
        self.llm.collective_rpc("receive_weight_broadcast", args=(list(metas),))
