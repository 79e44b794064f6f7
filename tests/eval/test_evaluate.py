"""Evaluation of a tiny model: accuracy equals the fraction of answers checked independently here."""
import pytest

from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.eval.evaluate import evaluate_hf_model, score_completions, summarize


def test_score_and_summarize_split_in_and_out_of_domain():
    gsm = load_examples("gsm8k", "offline", "test", limit=3)
    arc = load_examples("arc_easy", "offline", "validation", limit=2)
    completions = [f"The answer is {gsm[0].answer}.", "The answer is 0.", "no idea",
                   f"The answer is ({arc[0].answer}).", "The answer is (Z)."]
    rows = score_completions(gsm + arc, completions)
    assert [r["correct"] for r in rows] == [True, False, False, True, False]
    assert [r["reason"] for r in rows][:3] == ["correct", "wrong", "no_answer"]
    result = summarize("m", rows, train_tasks=["gsm8k"])
    assert result.per_task["gsm8k"].accuracy == pytest.approx(1 / 3)
    assert result.in_domain.accuracy == pytest.approx(1 / 3) and result.in_domain.total == 3
    assert result.out_of_domain.accuracy == pytest.approx(1 / 2) and result.out_of_domain.total == 2


def independent_verdicts(model_dir, examples, rows):
    """Greedy decode one prompt at a time, check each answer here; the rows must hold the same texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfrefine_dist.data.sft_dataset import render_prompt
    from selfrefine_dist.data.tasks import get_task
    from selfrefine_dist.rewards import check_answer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    correct = []
    for ex, row in zip(examples, rows):
        enc = tok(render_prompt(tok, get_task(ex.task).user_prompt(ex)), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == row["completion"] and row["uid"] == ex.uid  # batched generation equals one-at-a-time
        correct.append(check_answer(text, ex.answer, get_task(ex.task).answer_type, ex.choices or None).correct)
    return correct


def test_tiny_model_accuracy_matches_an_independent_count(tiny_model_dir):
    examples = load_examples("gsm8k", "offline", "test", limit=6) + load_examples("obqa", "offline", "test", limit=6)
    result = evaluate_hf_model("tiny", str(tiny_model_dir), examples, ["gsm8k"], max_new_tokens=12, batch_size=4,
                               progress=False)
    correct = independent_verdicts(tiny_model_dir, examples, result.samples)
    assert result.in_domain.accuracy == pytest.approx(sum(correct[:6]) / 6)
    assert result.out_of_domain.accuracy == pytest.approx(sum(correct[6:]) / 6)


@pytest.mark.slow
def test_evaluation_on_sampler_actors_matches_an_independent_count(tiny_model_dir):
    import ray
    from transformers import AutoTokenizer

    from selfrefine_dist.config.schema import SamplerConfig
    from selfrefine_dist.eval.evaluate import evaluate_with_pool
    from selfrefine_dist.sampling.pool import SamplerPool

    examples = load_examples("gsm8k", "offline", "test", limit=4) + load_examples("obqa", "offline", "test", limit=4)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = SamplerPool(SamplerConfig(backend="hf", num_actors=2, chunk_size=3, cpus_per_actor=1), str(tiny_model_dir),
                           "fp32")
        result = evaluate_with_pool("tiny", pool, tok, examples, ["gsm8k"], max_new_tokens=12, pass_k=3, progress=False)
    finally:
        ray.shutdown()
    correct = independent_verdicts(tiny_model_dir, examples, result.samples)
    assert result.in_domain.accuracy == pytest.approx(sum(correct[:4]) / 4)
    assert result.out_of_domain.accuracy == pytest.approx(sum(correct[4:]) / 4)
    assert set(result.pass_at_k) == {"gsm8k", "obqa"} and all(0 <= v <= 1 for v in result.pass_at_k.values())
