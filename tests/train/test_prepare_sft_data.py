"""prepare_sft_data: each data.train slice with its own target style, counted per slice (no training)."""
import json
from dataclasses import asdict

import pytest

from selfrefine_dist.config import load_config
from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.train.sft import prepare_sft_data

MIXED = ("data.train=[{task: chain_sum, source: offline, split: train, limit: 16},"
         " {task: csqa, source: offline, split: train, limit: 8, prompt_style: direct}]")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def response_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t in item.labels if t != -100])


def test_mixed_cot_and_direct_slices(tokenizer, tmp_path):
    cfg = load_config(overrides=[MIXED, "data.max_len=512"])  # data.prompt_style: cot, the default
    items, report = prepare_sft_data(cfg, tokenizer, tmp_path / "sft")
    chain = load_examples("chain_sum", "offline", "train", limit=16)
    csqa = load_examples("csqa", "offline", "train", limit=8)
    assert [it.uid for it in items] == [e.uid for e in chain + csqa]
    for ex, item in zip(chain, items):
        assert response_text(tokenizer, item).startswith(f"{ex.rationale}\nThe answer is {ex.answer}.")
    for ex, item in zip(csqa, items[16:]):
        assert response_text(tokenizer, item).startswith(f"The answer is {ex.answer}.<|im_end|>")
    written = json.loads((tmp_path / "sft" / "data_report.json").read_text())
    assert written == report
    assert [(s["name"], s["style"], s["loaded"], s["tokenize"]["kept"]) for s in report["slices"]] == [
        ("data.train[0] chain_sum/train", "cot", 16, 16), ("data.train[1] csqa/train", "direct", 8, 8)]
    assert report["slices"][1]["demonstrations"] is None
    assert report["demonstrations"]["kept"] == 16 and report["tokenize"]["kept"] == 24

    # data.prompt_style=direct applies to slices that do not name their own style
    cfg = load_config(overrides=[MIXED.replace("limit: 16}", "limit: 16, prompt_style: cot}").replace(
        "prompt_style: direct", "prompt_style: null"), "data.prompt_style=direct"])
    items, report = prepare_sft_data(cfg, tokenizer, tmp_path / "sft2")
    assert [s["style"] for s in report["slices"]] == ["cot", "direct"]
    assert response_text(tokenizer, items[0]).startswith(chain[0].rationale)
    assert response_text(tokenizer, items[-1]).startswith(f"The answer is {csqa[-1].answer}.<|im_end|>")


def test_teacher_demonstrations_replace_the_rationales_of_cot_slices(tokenizer, tmp_path):
    chain = load_examples("chain_sum", "offline", "train", limit=4)
    teacher = [{**asdict(ex), "rationale": f"Teacher: {ex.rationale} The answer is {ex.answer}."} for ex in chain[:3]]
    (tmp_path / "teach").mkdir()
    (tmp_path / "teach" / "demonstrations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in teacher))
    cfg = load_config(overrides=[MIXED.replace("limit: 16", "limit: 4"), "teach.enabled=true", "teach.model=x"])
    items, report = prepare_sft_data(cfg, tokenizer, tmp_path / "sft")
    assert [it.uid for it in items[:3]] == [ex.uid for ex in chain[:3]]  # the teacher missed the fourth
    assert all(response_text(tokenizer, it).startswith("Teacher: ") for it in items[:3])
    assert report["slices"][0]["demonstrations"]["dropped"] == {"no_rationale": 1}
    assert report["slices"][1]["tokenize"]["kept"] == 8  # the direct slice needs no teacher
