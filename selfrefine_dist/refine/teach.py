"""Teacher demonstrations: a teacher answers ``data.train`` step by step; answers that match the
gold answer become the SFT input.

The teacher is a model on the sampler actors (``teach.model``: a hub id, a folder, ``pypi:...``)
or any OpenAI-compatible server (``teach.endpoint``, chat completions API). Output:

    <run>/teach/demonstrations.jsonl   one kept demonstration per question (ReasoningExample fields)
    <run>/teach/report.json            questions, kept, dropped by the verdict of their samples
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Sequence

from selfrefine_dist import artifacts
from selfrefine_dist.config import Config
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.demonstrations import demonstrations_path
from selfrefine_dist.data.sources import load_slices
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.rewards import check_answer
from selfrefine_dist.sampling.records import GeneratedText


def run_teach_stage(cfg: Config, run_dir: Path) -> Path:
    out = demonstrations_path(run_dir)
    if out.is_file():
        print(f"teach: done earlier ({out})", flush=True)
        return out
    questions = load_slices(cfg.data.train)
    if not questions:
        raise ValueError("data.train: no questions for the teacher")
    user_prompts = {ex.uid: get_task(ex.task).user_prompt(ex, "cot") for ex in questions}
    t = cfg.teach
    if t.endpoint:
        texts = endpoint_completions(t.endpoint, t.endpoint_model or "", user_prompts, t.samples_per_question,
                                     t.temperature, t.max_new_tokens, os.environ.get(t.api_key_env))
    else:
        texts = pool_completions(cfg, user_prompts)
    kept, report = select_teacher_answers(questions, texts)
    artifacts.write_json(out.parent / "report.json", report)
    artifacts.write_jsonl(out, [asdict(ex) for ex in kept])
    print(f"teach: kept {report['kept']} of {report['questions']} demonstrations (dropped: {report['dropped'] or 'none'})",
          flush=True)
    return out


def select_teacher_answers(questions: Sequence[ReasoningExample], texts: Dict[str, List[GeneratedText]]):
    """Per question, the first sample whose final answer matches the gold; the rest are counted."""
    kept, dropped = [], Counter()
    for ex in questions:
        samples = texts.get(ex.uid, [])
        spec = get_task(ex.task)
        verdicts = [check_answer(s.text, ex.answer, spec.answer_type, ex.choices or None) for s in samples]
        good = [s for s, v in zip(samples, verdicts) if v.correct]
        if good:
            kept.append(replace(ex, rationale=good[0].text.strip()))
        else:
            dropped[verdicts[0].reason if verdicts else "no_samples"] += 1
    return kept, {"questions": len(questions), "kept": len(kept), "dropped": dict(dropped)}


def pool_completions(cfg: Config, user_prompts: Dict[str, str]) -> Dict[str, List[GeneratedText]]:
    """The teacher model on sampler actors of its own (shut down afterwards)."""
    from selfrefine_dist.data.sft_dataset import render_prompt
    from selfrefine_dist.models.loading import load_tokenizer, resolve_dtype, resolve_model_path
    from selfrefine_dist.cluster import start_ray
    from selfrefine_dist.sampling.pool import SamplerPool
    from selfrefine_dist.sampling.records import GenerationRequest, SamplingSettings

    start_ray(cfg)
    teacher = resolve_model_path(cfg.teach.model)
    tokenizer = load_tokenizer(teacher, cfg.model.trust_remote_code)
    pool = SamplerPool(cfg.sampler, teacher, resolve_dtype(cfg.model.dtype), cfg.model.trust_remote_code,
                       resources=cfg.ray.sampler_resources)
    try:
        requests = [GenerationRequest(uid, render_prompt(tokenizer, text), cfg.teach.samples_per_question)
                    for uid, text in user_prompts.items()]
        settings = SamplingSettings(cfg.teach.temperature, 1.0, cfg.teach.max_new_tokens, seed=cfg.sampler.seed)
        return pool.generate(requests, settings)
    finally:
        pool.shutdown()


def endpoint_completions(endpoint: str, model: str, user_prompts: Dict[str, str], n: int, temperature: float,
                         max_tokens: int, api_key: str | None, workers: int = 8) -> Dict[str, List[GeneratedText]]:
    """Chat completions from an OpenAI-compatible server, a few requests in flight at once."""
    url = endpoint.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def ask(item):
        uid, text = item
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "n": n,
                           "temperature": temperature, "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, json.JSONDecodeError) as e:
            raise RuntimeError(f"teacher endpoint {url} failed on question {uid}: {e}") from None
        choices = reply.get("choices") or []
        tokens = (reply.get("usage") or {}).get("completion_tokens", 0)
        return uid, [GeneratedText(text=(c.get("message") or {}).get("content") or "", num_tokens=tokens // max(len(choices), 1),
                                   finish_reason=c.get("finish_reason") or "") for c in choices]

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(ask, user_prompts.items()))
