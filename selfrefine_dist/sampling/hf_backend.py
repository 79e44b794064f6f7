"""Sampling with transformers ``generate``: the reference backend (and the fallback without vLLM)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch

from selfrefine_dist.models.loading import load_causal_lm, load_tokenizer
from selfrefine_dist.sampling.records import GeneratedText, GenerationRequest, SamplingSettings, work_item_seed
from selfrefine_dist.sampling.weights import NamedTensor, tensor_sha256


class HFBackend:
    """A causal LM on CPU or the current GPU, ``batch_size`` prompts (x n samples) per ``generate`` call."""

    def __init__(self, model_path: str, dtype: str, batch_size: int = 16, num_threads: int = 0,
                 trust_remote_code: bool = False):
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        self.model = load_causal_lm(model_path, dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.batch_size = batch_size
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = sorted(set(eos) | {self.tokenizer.eos_token_id})

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings) -> List[List[GeneratedText]]:
        from transformers import GenerationConfig

        torch.manual_seed(work_item_seed(settings.seed, requests))
        # top_k=0: no top-k (vLLM's default); None would be filled with transformers' default of 50.
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
            temperature=settings.temperature if not settings.greedy else None,
            top_p=settings.top_p if not settings.greedy else None, top_k=0,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_token_ids,
        )
        outputs: List[List[GeneratedText]] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            # One row per sample; greedy samples are identical, so each prompt runs once.
            copies = [1 if settings.greedy else r.n for r in batch]
            prompts = [r.prompt for r, c in zip(batch, copies) for _ in range(c)]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            sequences = self.model.generate(**enc, generation_config=config)
            rows = [self._completion(row) for row in sequences[:, enc["input_ids"].shape[1] :]]
            offset = 0
            for request, count in zip(batch, copies):
                mine = rows[offset : offset + count]
                outputs.append(mine * request.n if settings.greedy else mine)
                offset += count
        return outputs

    def _completion(self, new_tokens: torch.Tensor) -> GeneratedText:
        """Cut a generated row [T] after its first stop token (the rest is padding)."""
        tokens = new_tokens.tolist()
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_token_ids), None)
        kept = tokens if stop is None else tokens[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return GeneratedText(text=text, num_tokens=len(kept), finish_reason="length" if stop is None else "stop")

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"{name!r} is not a parameter of {type(self.model).__name__}")
            params[name].copy_(tensor)

    def weight_checksums(self) -> Dict[str, str]:
        return {name: tensor_sha256(p) for name, p in self.model.named_parameters()}
