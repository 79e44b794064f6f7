"""Load a Hugging Face folder in vLLM and print the log-probs of a prompt's tokens as JSON.

Run as a script (vLLM spawns engine processes, which needs the __main__ guard):
    python vllm_prompt_logprobs.py MODEL_DIR "prompt text"
"""
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    model_dir, prompt = sys.argv[1], sys.argv[2]
    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0))[0]
    logprobs = [None if d is None else d[tok].logprob for tok, d in zip(out.prompt_token_ids, out.prompt_logprobs)]
    print("RESULT " + json.dumps({"token_ids": out.prompt_token_ids, "logprobs": logprobs,
                                  "generated": list(out.outputs[0].token_ids)}))
