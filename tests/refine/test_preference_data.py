"""Pairs -> token ids -> batches -> per-rank plans: what the learners receive."""
from selfrefine_dist.data.sft_dataset import render_conversation, render_prompt
from selfrefine_dist.models.loading import load_tokenizer
from selfrefine_dist.refine.preference_data import collate_pairs, plan_round, tokenize_pairs
from selfrefine_dist.refine.records import PreferenceExample, PreferencePair, examples_digest


def test_tokenized_like_sft_and_too_long_dropped(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    prompt = render_prompt(tok, "What is 2+2?")
    pairs = [PreferencePair("u1", "gsm8k", prompt, "2+2=4. The answer is 4.", "The answer is 5.", "cot_correct", "cot_incorrect"),
             PreferencePair("u2", "gsm8k", prompt, "x " * 400, "y", "cot_correct", "cot_incorrect")]
    examples, dropped = tokenize_pairs(pairs, tok, max_len=128)
    assert dropped == {"too_long": 1} and len(examples) == 1
    ex = examples[0]
    # prompt + chosen tokens are exactly what SFT would tokenize for that conversation
    full = render_conversation(tok, "What is 2+2?", "2+2=4. The answer is 4.")
    assert tok.decode(list(ex.prompt_ids + ex.chosen_ids)) == tok.decode(tok(full, add_special_tokens=False)["input_ids"])

    batch = collate_pairs([ex, ex], pad_token_id=0)
    assert batch.input_ids.shape[0] == 4 and batch.num_pairs == 2
    n_chosen = len(ex.prompt_ids) + len(ex.chosen_ids)
    assert batch.attention_mask[0].sum() == n_chosen
    assert (batch.labels[0, : len(ex.prompt_ids)] == -100).all()
    assert batch.labels[0, len(ex.prompt_ids): n_chosen].tolist() == list(ex.chosen_ids)
    assert batch.labels[2, len(ex.prompt_ids): len(ex.prompt_ids) + len(ex.rejected_ids)].tolist() == list(ex.rejected_ids)


def test_plan_round_gives_every_rank_equal_full_batches():
    examples = [PreferenceExample(f"u{i}", (1,), (2, i), (3,)) for i in range(23)]
    plan = plan_round(examples, world_size=2, micro_batch_size=2, grad_accum=2, epochs=2, seed=0)
    assert plan.global_batch == 8 and plan.steps == 4 and plan.unused == 7
    for shard in plan.shards:
        assert len(shard) == 4 and all(len(step) == 2 and all(len(m) == 2 for m in step) for step in shard)
    epoch0 = [ex.uid for step in range(2) for shard in plan.shards for ex in sum(shard[step], [])]
    assert len(set(epoch0)) == 16  # no pair twice within an epoch
    again = plan_round(examples, 2, 2, 2, 2, seed=0)
    assert [examples_digest(sum(sum(s, []), [])) for s in again.shards] == [
        examples_digest(sum(sum(s, []), [])) for s in plan.shards]
