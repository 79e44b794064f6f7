"""Pairs -> token ids -> batches -> per-rank plans: what the learners receive."""
import pytest
import torch

from selfrefine_dist.data.sft_dataset import render_conversation, render_prompt
from selfrefine_dist.models.loading import load_tokenizer
from selfrefine_dist.refine.preference_data import collate_packed_pairs, collate_pairs, plan_round, tokenize_pairs
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


def test_packed_rows_layout():
    """Row = prompt + chosen + rejected; rejected restarts its positions after the prompt and never
    sees the chosen tokens; each response token is predicted from the right position."""
    a = PreferenceExample("a", (10, 11, 12), (20, 21), (30, 31, 32))
    b = PreferenceExample("b", (13,), (22, 23, 24), (33,))
    batch = collate_packed_pairs([a, b], pad_token_id=0)
    assert batch.num_pairs == 2 and batch.num_tokens == a.num_tokens + b.num_tokens == 11 + 6
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32], [13, 22, 23, 24, 33, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert batch.position_ids[1, :5].tolist() == [0, 1, 2, 3, 1]
    mask = batch.attention_mask[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False]  # rejected[0]: prompt + itself
    assert mask[4].tolist() == [True] * 5 + [False] * 3  # chosen[1]: prompt + chosen so far
    pad_rows = batch.attention_mask[1, 0, 5:]
    assert pad_rows.sum(1).tolist() == [1, 1, 1] and pad_rows[:, 5:].diagonal().all()  # no empty row
    # rows 0, 1 chosen; 2, 3 rejected (of pairs a, b); targets padded with -100
    assert batch.targets.tolist() == [[20, 21, -100], [22, 23, 24], [30, 31, 32], [33, -100, -100]]
    # positions: flat indices into the [2 x 8] rows (row * 8 + column)
    assert batch.positions[0, :2].tolist() == [2, 3] and batch.positions[2].tolist() == [2, 5, 6]
    assert batch.positions[1].tolist() == [8, 9, 10] and batch.positions[3, 0].item() == 8
    assert batch.segments == ()
    assert_predicted_from_previous_token(batch, [a, b])


def assert_predicted_from_previous_token(batch, pairs):
    """Each response token's predicting state sits on the token just before it in its own sequence."""
    flat_ids = batch.input_ids.flatten()
    for s in range(2 * len(pairs)):
        pair, valid = pairs[s % len(pairs)], batch.targets[s] != -100
        response = pair.chosen_ids if s < len(pairs) else pair.rejected_ids
        assert batch.targets[s][valid].tolist() == list(response)
        assert flat_ids[batch.positions[s][valid]].tolist() == list(pair.prompt_ids[-1:] + response[:-1])


def test_packed_pairs_in_one_row():
    """one_row: the pairs side by side, no padding; positions restart per pair; the mask is block-diagonal
    (no pair sees another) and equals each pair's own mask on its block; segments name the blocks."""
    a = PreferenceExample("a", (10, 11, 12), (20, 21), (30, 31, 32))
    b = PreferenceExample("b", (13,), (22, 23, 24), (33,))
    batch = collate_packed_pairs([a, b], pad_token_id=0, one_row=True)
    alone = [collate_packed_pairs([ex], pad_token_id=0) for ex in (a, b)]
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 13, 22, 23, 24, 33]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3, 1]]
    assert batch.segments == ((0, 8), (8, 13))
    mask = batch.attention_mask[0, 0]
    assert not mask[:8, 8:].any() and not mask[8:, :8].any()
    assert torch.equal(mask[:8, :8], alone[0].attention_mask[0, 0]) and torch.equal(mask[8:, 8:], alone[1].attention_mask[0, 0])
    assert batch.num_pairs == 2 and batch.num_tokens == a.num_tokens + b.num_tokens
    assert batch.positions[1].tolist() == [8, 9, 10] and batch.positions[3, 0].item() == 8
    assert_predicted_from_previous_token(batch, [a, b])


def test_packed_sequences_in_one_row():
    """A reference pass's segments: a prompt with two responses (the pair mask) or one (causal)."""
    from selfrefine_dist.refine.preference_data import collate_packed_sequences

    rows = collate_packed_sequences([((10, 11), ((20, 21), (30,))), ((12,), ((22, 23, 24),))], pad_token_id=0)
    assert rows.input_ids.tolist() == [[10, 11, 20, 21, 30, 12, 22, 23, 24]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3]]
    assert rows.segments == ((0, 5), (5, 9))
    assert rows.targets.tolist() == [[20, 21, -100], [30, -100, -100], [22, 23, 24]]
    assert rows.positions[0, :2].tolist() == [1, 2] and rows.positions[1, 0].item() == 1
    assert rows.positions[2].tolist() == [5, 6, 7]
    assert torch.equal(rows.attention_mask[0, 0, 5:, 5:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_packing_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="non-empty"):
        collate_packed_pairs([PreferenceExample("a", (), (1,), (2,))], pad_token_id=0)
