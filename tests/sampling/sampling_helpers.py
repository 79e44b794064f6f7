"""Shared pieces of the sampling tests: configs, prompts, perturbed weights, completeness checks."""
from typing import Dict, List

import torch

from selfrefine_dist.config.schema import SamplerConfig
from selfrefine_dist.sampling.records import GenerationRequest


def sampler_config(backend: str, num_actors: int, chunk_size: int = 2) -> SamplerConfig:
    # Half a CPU per actor: a module's pools fit in the 4 CPUs its Ray instance declares.
    return SamplerConfig(backend=backend, num_actors=num_actors, chunk_size=chunk_size, cpus_per_actor=0.5,
                         max_model_len=512, kv_cache_gib=1, hf_batch_size=4, max_restarts=2)


def make_requests(model_dir, count: int, n=lambda i: 1 + i % 3) -> List[GenerationRequest]:
    """Chat-rendered GSM8K questions; request i asks for n(i) samples."""
    from selfrefine_dist.data.sources import load_examples
    from selfrefine_dist.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    examples = load_examples("gsm8k", "offline", "test", limit=count)
    return [GenerationRequest(key=ex.uid, n=n(i), prompt=tokenizer.apply_chat_template(
        [{"role": "user", "content": ex.question}], tokenize=False, add_generation_prompt=True))
        for i, ex in enumerate(examples)]


def perturbed_state_dict(model_dir, seed: int, scale: float = 0.5) -> Dict[str, torch.Tensor]:
    """The model's Hugging Face state dict plus Gaussian noise (what a training step would send)."""
    from selfrefine_dist.models.loading import load_causal_lm

    model = load_causal_lm(str(model_dir), "fp32")
    generator = torch.Generator().manual_seed(seed)
    return {name: t + scale * torch.randn(t.shape, generator=generator) for name, t in model.state_dict().items()
            if name != "lm_head.weight"}  # tied to the embedding


def put_buckets(state_dict: Dict[str, torch.Tensor], bucket_bytes: int = 64 * 1024) -> list:
    import ray

    from selfrefine_dist.sampling.weights import named_tensor_buckets

    return [ray.put(bucket) for bucket in named_tensor_buckets(state_dict.items(), bucket_bytes)]


def assert_complete(requests: List[GenerationRequest], results) -> None:
    """Every key once, with its n texts."""
    assert sorted(results) == sorted(r.key for r in requests)
    for request in requests:
        texts = results[request.key]
        assert len(texts) == request.n
        for text in texts:
            assert isinstance(text.text, str) and text.num_tokens >= 1 and text.finish_reason in ("stop", "length")


def parent_pid(pid: int) -> int:
    """The parent of process ``pid`` (0 once it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` is ``ancestor`` or started under it (its parent chain reaches it)."""
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent_pid(pid)
    return False


def kill_processes_titled(title: str, count: int, timeout_s: float = 120.0) -> "threading.Thread":
    """A started thread that SIGKILLs, from outside, the first ``count`` processes whose title (Ray sets
    ``ray::Class.method`` while an actor runs a method) is ``title``; ``thread.killed`` lists their pids.

    Only this process's descendants (the workers of the Ray instance this test process started): another
    test process on the machine (pytest-xdist's other worker) may run actors of the same title."""
    import os
    import signal
    import threading
    import time

    me = os.getpid()

    def run():
        deadline = time.time() + timeout_s
        while len(thread.killed) < count and time.time() < deadline:
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) in thread.killed:
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        name = f.read().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if name.strip() == title and descends_from(int(entry), me):
                    os.kill(int(entry), signal.SIGKILL)
                    thread.killed.append(int(entry))
                    break
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.killed = []
    thread.start()
    return thread
