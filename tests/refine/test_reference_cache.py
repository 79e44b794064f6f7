"""Reference log-probs per distinct sequence (refine/reference_cache.py): which sequences run, how they
are batched, and that the values equal a plain forward of each sequence."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfrefine_dist.data.records import SFTBatch
from selfrefine_dist.models.loading import load_causal_lm
from selfrefine_dist.models.logprobs import decoder_hidden_states
from selfrefine_dist.refine.reference_cache import ReferenceCache, load_tables, reference_batches, save_table
from selfrefine_dist.refine.reference_cache import sequence_key
from selfrefine_dist.models.segments import enable_segment_attention
from selfrefine_dist.refine import reference_cache
from selfrefine_dist.refine.records import PackedRows, PreferenceExample
from selfrefine_dist.train.distributed import free_port


def test_keys_tell_where_the_prompt_ends():
    assert sequence_key((1, 2), (3,)) != sequence_key((1,), (2, 3))
    assert sequence_key((1, 2), (3,)) == sequence_key((1, 2), (3,))


def test_missing_lists_each_new_sequence_once_by_prompt():
    a, b = (1, 2), (5,)
    examples = [PreferenceExample("q1", a, (3,), (4,)), PreferenceExample("q1", a, (3,), (6,)),  # (3,) twice
                PreferenceExample("q2", b, (4,), (3,)), PreferenceExample("q1", a, (6,), (4,))]
    cache = ReferenceCache()
    groups = cache.missing(examples)
    assert [(g.prompt_ids, g.responses) for g in groups] == [(a, [(3,), (4,), (6,)]), (b, [(4,), (3,)])]
    cache.store([sequence_key(a, (3,)), sequence_key(b, (4,))], torch.tensor([-1.5, -2.5]))
    assert [(g.prompt_ids, g.responses) for g in cache.missing(examples)] == [(a, [(4,), (6,)]), (b, [(3,)])]
    with pytest.raises(KeyError):
        cache.pair_logps(examples[:1])  # (a, (4,)) is not known yet
    cache.store([sequence_key(a, (4,))], torch.tensor([-0.25]))
    chosen, rejected = cache.pair_logps(examples[:1])
    assert chosen.tolist() == [-1.5] and rejected.tolist() == [-0.25] and chosen.dtype == torch.float32
    with pytest.raises(ValueError, match="2 sequence keys for 1 log-probs"):
        cache.store([sequence_key(a, (4,)), sequence_key(a, (6,))], torch.tensor([0.0]))


def test_saved_tables_give_back_the_same_floats_of_their_own_reference(tmp_path):
    """A table written and read back holds the very floats stored (a resumed round must run with the
    uninterrupted run's values); tables of another reference or dtype, and missing rounds, add nothing."""
    a, b = sequence_key((1, 2), (3,)), sequence_key((1,), (2, 3))
    cache = ReferenceCache()
    cache.store([a, b], torch.tensor([-1.2345678, -9.87654321e-3]))  # float32 values, as the reference gives
    round1, round2, other = tmp_path / "r1.json", tmp_path / "r2.json", tmp_path / "other.json"
    save_table(round1, cache.table([a, b]), "sft-fp", "bfloat16")
    save_table(round2, {a.hex(): 7.0, sequence_key((4,), (5,)).hex(): -3.0}, "sft-fp", "bfloat16")  # a: earlier wins
    save_table(other, {sequence_key((9,), (9,)).hex(): -1.0}, "another-fp", "bfloat16")
    table = load_tables([round1, tmp_path / "missing.json", round2, other], "sft-fp", "bfloat16")
    assert table == {a.hex(): cache.logps[a], b.hex(): cache.logps[b], sequence_key((4,), (5,)).hex(): -3.0}
    restored = ReferenceCache.from_table(table)
    assert restored.logps[a] == cache.logps[a] and restored.logps[b] == cache.logps[b]
    assert load_tables([round1], "sft-fp", "float32") == {}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: not a table of reference log-probs"):
        load_tables([tmp_path / "bad.json"], "sft-fp", "bfloat16")


def summed_logps(logits, targets):
    """[rows] sum over t of log_softmax(logits)[row, t, targets[row, t]], targets -100 skipped."""
    token = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * (targets != -100)).sum(-1)


def plain_logp(model, prompt, response):
    """Summed log-prob of ``response`` after ``prompt``: one unpadded sequence, the model's own logits."""
    ids = torch.tensor([prompt + response])
    targets = torch.tensor([[-100] * (len(prompt) - 1) + list(response)])
    with torch.no_grad():
        return summed_logps(model(input_ids=ids).logits[:, :-1], targets).item()


def batch_logps(model, batch):
    """[rows] summed log-probs of a reference batch: packed rows through ``positions`` (and per-segment
    attention where the batch names segments), as the learner reads them."""
    with torch.no_grad():
        if isinstance(batch, PackedRows):
            segments = {"segments": batch.segments} if batch.segments else {}
            hidden, weight = decoder_hidden_states(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                   position_ids=batch.position_ids, **segments)
            return summed_logps(hidden.flatten(0, 1)[batch.positions] @ weight.T, batch.targets)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return summed_logps(logits[:, :-1], batch.labels[:, 1:])


@pytest.mark.parametrize("packed,per_forward,one_row,row_tokens",
                         [(True, 1, False, None), (True, 2, False, None), (False, 1, False, None),
                          (True, 1, True, 1024), (True, 1, True, 15)])
def test_batches_give_each_sequence_its_own_log_prob(tiny_model_dir, monkeypatch, packed, per_forward, one_row,
                                                     row_tokens):
    """Every layout gives each sequence the log-prob of a plain forward of it alone. one_row: the segments
    side by side (per-segment attention), as many to a row as ROW_TOKENS allows (15: one, then two)."""
    model = load_causal_lm(str(tiny_model_dir), "fp32").eval()
    if one_row:
        assert enable_segment_attention(model)
        monkeypatch.setattr(reference_cache, "ROW_TOKENS", row_tokens)
    prompts = [(5, 9, 14, 3), (7, 2)]
    examples = [PreferenceExample("q1", prompts[0], (11, 12, 13), (21,)),
                PreferenceExample("q1", prompts[0], (11, 12, 13), (31, 32)),
                PreferenceExample("q2", prompts[1], (41, 42, 43, 44, 45), (51, 52))]
    groups = ReferenceCache().missing(examples)
    batches = list(reference_batches(groups, packed, pad_token_id=0, pairs_per_forward=per_forward, one_row=one_row))
    kinds = [type(b).__name__ for b, _ in batches]
    if one_row:  # segments: q1's twin (8 tokens), q2's twin (9), q1's single (6)
        assert kinds == ["PackedRows"] * len(batches)
        assert [b.segments for b, _ in batches] == ([((0, 8), (8, 17), (17, 23))] if row_tokens == 1024
                                                    else [(), ((0, 9), (9, 15))])
        assert [b.input_ids.shape[1] for b, _ in batches] == ([23] if row_tokens == 1024 else [8, 15])
    elif packed:  # q1: three responses, a packed twin and one alone; q2: a twin
        assert kinds.count("PackedPreferenceBatch") == (2 if per_forward == 1 else 1)
        assert kinds.count("SFTBatch") == 1
    else:
        assert set(kinds) == {"SFTBatch"} and len(batches) == math.ceil(5 / (2 * per_forward))
    keys = [k for _, ks in batches for k in ks]
    assert sorted(keys) == sorted({sequence_key(g.prompt_ids, r) for g in groups for r in g.responses})
    cache = ReferenceCache()
    for batch, ks in batches:
        assert isinstance(batch, (PackedRows, SFTBatch))
        cache.store(ks, batch_logps(model, batch))
    chosen, rejected = cache.pair_logps(examples)
    want_chosen = [plain_logp(model, ex.prompt_ids, ex.chosen_ids) for ex in examples]
    want_rejected = [plain_logp(model, ex.prompt_ids, ex.rejected_ids) for ex in examples]
    assert chosen.tolist() == pytest.approx(want_chosen, rel=1e-5, abs=1e-5)
    assert rejected.tolist() == pytest.approx(want_rejected, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_ranks_with_unequal_new_sequences_run_the_same_forwards(tiny_model_dir, tmp_path):
    """ZeRO-3, two ranks: rank 0 has 8 new sequences (4 packed rows), rank 1 has 2 (1 row) and joins
    rank 0's other forwards with filler rows. Both finish, with the values of a plain forward."""
    worker, port = Path(__file__).with_name("uneven_reference_worker.py"), free_port()
    outs = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(worker), str(tiny_model_dir), str(r), str(port), str(outs[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0]["run"] == [8, 8] and results[1]["run"] == [2, 8]
    assert results[0]["run_in_round"] == results[1]["run_in_round"] == [0, 8]  # a frozen reference's values, kept
    for r in results:
        direct = torch.tensor(r["direct"])  # [pairs, 2]: chosen, rejected
        assert r["chosen"] == pytest.approx(direct[:, 0].tolist(), rel=1e-5)
        assert r["rejected"] == pytest.approx(direct[:, 1].tolist(), rel=1e-5)
        assert math.isfinite(r["loss"])
    assert results[0]["loss"] == results[1]["loss"]  # the step's loss, averaged over both ranks
