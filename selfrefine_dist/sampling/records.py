"""Typed records of the sampling hop: what goes to a sampler and what comes back.

    GenerationRequest (a rendered prompt, K samples wanted)
        -> SamplerPool.generate(requests, SamplingSettings)
        -> {key: [GeneratedText] * K}, and SamplingStats for the round
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class GenerationRequest:
    """One question to sample: ``n`` completions of ``prompt``.

    ``prompt`` is the already chat-rendered text (template applied, generation
    prompt appended); ``key`` names the question in the returned dict.
    """

    key: str
    prompt: str
    n: int


@dataclass(frozen=True)
class GeneratedText:
    """One completion.

    ``text`` is decoded without special tokens (it may be empty); ``num_tokens``
    counts every generated token, the stop token included; ``finish_reason`` is
    "stop" (an end-of-sequence token) or "length" (``max_new_tokens`` reached).
    """

    text: str
    num_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling parameters shared by every request of a call.

    ``temperature == 0`` is greedy decoding (then the ``n`` completions of a
    request are identical, and are generated once). ``seed`` makes a run
    reproducible: each work item seeds its sampler from (seed, its requests).
    """

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SamplingStats:
    """Totals of one ``SamplerPool.generate`` call."""

    questions: int
    samples: int
    generated_tokens: int
    seconds: float
    # Work items sent again after their actor died.
    retried_items: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def work_item_seed(seed: int, requests: Sequence[GenerationRequest]) -> int:
    """A 63-bit seed from the run's seed and a work item's requests (keys, prompts, n).

    The same item gets the same seed whichever actor runs it, and on a retry.
    """
    digest = hashlib.sha256(str(seed).encode())
    for request in requests:
        digest.update(b"\0" + request.key.encode() + b"\0" + request.prompt.encode() + b"\0" + str(request.n).encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)
