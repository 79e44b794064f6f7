"""SFT tokenization: chat template from the tokenizer, loss on response tokens only, long rows dropped."""
import pytest

from selfrefine_dist.data.sft_dataset import build_sft_examples, collate, render_prompt, tokenize_pair
from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.data.tasks import get_task


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_cover_exactly_the_response(tokenizer):
    item = tokenize_pair(tokenizer, "u", "What is 2+2?", "2+2=4.\nThe answer is 4.")
    n_prompt = len(tokenizer(render_prompt(tokenizer, "What is 2+2?"), add_special_tokens=False)["input_ids"])
    assert all(t == -100 for t in item.labels[:n_prompt])
    assert list(item.labels[n_prompt:]) == list(item.input_ids[n_prompt:])
    response = tokenizer.decode(item.input_ids[n_prompt:])
    assert response.startswith("2+2=4.\nThe answer is 4.") and response.rstrip().endswith("<|im_end|>")
    # the prompt is the tokenizer's own chat template with a generation prompt
    assert tokenizer.decode(item.input_ids[:n_prompt]).endswith("<|im_start|>assistant\n")


def test_prompts_and_targets_per_task():
    gsm = load_examples("gsm8k", "offline", "test", limit=1)[0]
    spec = get_task("gsm8k")
    assert spec.user_prompt(gsm, "cot").endswith("Let's think step by step, then finish with \"The answer is X.\"")
    assert spec.target_response(gsm, "cot").endswith("The answer is 18.")
    assert spec.target_response(gsm, "direct") == "The answer is 18."
    csqa = load_examples("csqa", "offline", "validation", limit=1)[0]
    prompt = get_task("csqa").user_prompt(csqa, "direct")
    assert "(A) bank (B) library (C) department store (D) mall (E) new york" in prompt
    assert "<letter>" in prompt
    with pytest.raises(ValueError, match="needs a rationale"):
        get_task("csqa").target_response(csqa, "cot")


def test_too_long_examples_are_dropped_and_counted(tokenizer):
    examples = load_examples("gsm8k", "offline", "test", limit=20)
    full, report_full = build_sft_examples(examples, tokenizer, max_len=4096)
    lengths = sorted(len(e.input_ids) for e in full)
    cut = lengths[10]
    kept, report = build_sft_examples(examples, tokenizer, max_len=cut)
    assert report.kept == len(kept) == sum(1 for n in lengths if n <= cut)
    assert report.dropped == {"too_long": 20 - report.kept} and report_full.dropped == {}
    for e in kept:  # nothing is truncated: every kept example still ends with its answer
        assert tokenizer.decode(e.input_ids).rstrip().endswith("<|im_end|>")


def test_collate_pads_right_and_masks(tokenizer):
    a = tokenize_pair(tokenizer, "a", "q", "short. The answer is 1.")
    b = tokenize_pair(tokenizer, "b", "a longer question here", "a much longer answer text. The answer is 2.")
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch.input_ids.shape == batch.labels.shape == (2, max(len(a.input_ids), len(b.input_ids)))
    assert int(batch.attention_mask[0].sum()) == len(a.input_ids)
    assert (batch.labels[0, len(a.input_ids):] == -100).all()
    assert batch.num_response_tokens == a.num_response_tokens + b.num_response_tokens
    assert batch.uids == ("a", "b")


def test_no_chat_template_falls_back_to_plain_frame(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert render_prompt(plain, "Q?") == "Question: Q?\nAnswer: "
    item = tokenize_pair(plain, "u", "Q?", "The answer is 1.")
    assert item.num_response_tokens > 0


def test_each_slice_trains_with_its_own_style(tokenizer):
    from selfrefine_dist.data.records import ReasoningExample
    from selfrefine_dist.data.sft_dataset import SFTSlice, build_sft_data

    chain = load_examples("chain_sum", "offline", "train", limit=12)
    wrong = ReasoningExample("chain_sum/x/wrong", "chain_sum", "Compute 1 + 1 =", "2", rationale="1 + 1 = 3.")
    csqa = load_examples("csqa", "offline", "train", limit=8)  # no rationale: direct is the only way to train it
    slices = [SFTSlice("data.train[0] chain_sum/train", "cot", tuple(chain) + (wrong,)),
              SFTSlice("data.train[1] csqa/train", "direct", tuple(csqa))]
    items, report = build_sft_data(slices, tokenizer, max_len=1024)
    assert [it.uid for it in items] == [e.uid for e in chain + csqa]  # slice order; the wrong demonstration dropped
    responses = [tokenizer.decode([t for t in it.labels if t != -100]) for it in items]
    prompts = [tokenizer.decode([t for t, label in zip(it.input_ids, it.labels) if label == -100]) for it in items]
    for ex, response, prompt in zip(chain, responses, prompts):
        assert response.startswith(f"{ex.rationale}\nThe answer is {ex.answer}.<|im_end|>")
        assert "Let's think step by step" in prompt
    for ex, response, prompt in zip(csqa, responses[len(chain):], prompts[len(chain):]):
        assert response.startswith(f"The answer is {ex.answer}.<|im_end|>")  # the answer sentence alone
        assert "Give only the final answer" in prompt and "(A)" in prompt
    cot, direct = report.slices
    assert (cot.name, cot.style, cot.loaded, cot.tokenize.kept) == ("data.train[0] chain_sum/train", "cot", 13, 12)
    assert cot.demonstrations.dropped == {"wrong": 1} and cot.demonstrations.dropped_examples == {"wrong": [wrong.uid]}
    assert (direct.style, direct.loaded, direct.demonstrations, direct.tokenize.kept) == ("direct", 8, None, 8)
    summary = report.as_dict()
    assert summary["demonstrations"]["kept"] == 12 and summary["tokenize"]["kept"] == 20
    assert [s["tokenize"]["kept"] for s in summary["slices"]] == [12, 8]
    assert cot.summary().startswith("data.train[0] chain_sum/train (cot): 12 sft examples of 13 loaded; demonstrations")


def test_too_long_examples_are_counted_in_their_slice(tokenizer):
    from selfrefine_dist.data.sft_dataset import SFTSlice, build_sft_data

    gsm = load_examples("gsm8k", "offline", "test", limit=10)
    csqa = load_examples("csqa", "offline", "train", limit=10)
    lengths = [len(e.input_ids) for e in build_sft_examples(gsm, tokenizer, 4096)[0]]
    cut = sorted(lengths)[4]
    _, report = build_sft_data([SFTSlice("gsm", "cot", tuple(gsm)), SFTSlice("csqa", "direct", tuple(csqa))],
                               tokenizer, max_len=cut)
    too_long_csqa = sum(len(e.input_ids) > cut for e in build_sft_examples(csqa, tokenizer, 4096, "direct")[0])
    assert report.slices[0].tokenize.dropped == {"too_long": sum(n > cut for n in lengths)}
    assert report.slices[1].tokenize.dropped == ({"too_long": too_long_csqa} if too_long_csqa else {})
    assert report.tokenize.kept == 20 - sum(n > cut for n in lengths) - too_long_csqa
    with pytest.raises(ValueError, match="unknown prompt style 'short'"):
        build_sft_data([SFTSlice("csqa", "short", tuple(csqa))], tokenizer, max_len=cut)
