"""Greedy generation with Hugging Face ``generate`` (the reference backend; vLLM comes with the sampler actors)."""
from __future__ import annotations

from typing import List, Sequence

import torch


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                    progress: bool = False) -> List[str]:
    """Completions for rendered prompts, in input order. Prompts are batched by length."""
    tokenizer.padding_side = "left"  # generation continues from the right edge
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: List[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", dynamic_ncols=True)
    model.eval()
    for idx in batches:
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
    return outputs
