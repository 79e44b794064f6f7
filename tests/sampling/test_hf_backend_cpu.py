"""HFBackend in-process: where a generated row is cut, and what it counts."""
import torch

from selfrefine_dist.sampling.hf_backend import HFBackend


def test_a_row_is_cut_after_its_first_stop_token(tiny_model_dir):
    backend = HFBackend(str(tiny_model_dir), "fp32", batch_size=2)
    tokenizer = backend.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    words = tokenizer(" 48 clips", add_special_tokens=False)["input_ids"]

    stopped = backend._completion(torch.tensor(words + [eos, pad, pad]))
    assert (stopped.text, stopped.num_tokens, stopped.finish_reason) == (" 48 clips", len(words) + 1, "stop")
    full = backend._completion(torch.tensor(words))
    assert (full.text, full.num_tokens, full.finish_reason) == (" 48 clips", len(words), "length")
    empty = backend._completion(torch.tensor([eos, pad]))
    assert (empty.text, empty.num_tokens, empty.finish_reason) == ("", 1, "stop")
