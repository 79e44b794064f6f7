"""User files (`source: file`): whatever is wrong with one is a DataError naming the file, the line
(JSONL, from 1) or row (Parquet, from 0) and the field; never another exception.

Property-based: hypothesis writes valid rows around one broken line (random bytes, truncated
JSON, bytes that are not UTF-8, wrong-typed, missing or non-finite fields, lone surrogates) and
checks the error points at exactly that line and field.
"""
import json
import math
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from selfrefine_dist.data.sources import DataError, load_examples

# derandomized: the same examples every run (CI never flakes), and no example database in the tree
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---- valid rows

texts = st.text(min_size=1, max_size=30).filter(lambda t: t.strip())
number_rows = st.fixed_dictionaries(
    {"question": texts, "answer": st.one_of(st.integers(-10**6, 10**6), st.integers(0, 999).map(str))},
    optional={"rationale": texts},
)
choice_rows = st.integers(2, 5).flatmap(lambda n: st.fixed_dictionaries({
    "question": texts,
    "choices": st.lists(texts, min_size=n, max_size=n),
    "answer": st.sampled_from("ABCDE"[:n]),
}))
TASK_ROWS = {"gsm8k": number_rows, "csqa": choice_rows}

# ---- one broken value per field: (field, value as it goes into the JSON line)

NOT_TEXT = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(texts, st.integers(), max_size=2),
                     st.booleans())
NOT_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"])  # raw JSON tokens


def _write(path: Path, lines) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _line(row: dict, ascii_only: bool) -> bytes:
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8")


def _error(task: str, path: str) -> str:
    with pytest.raises(DataError) as caught:
        load_examples(task, "file", "train", path=path)
    return str(caught.value)


@st.composite
def file_with_one_bad_line(draw):
    """(task, lines as bytes, 1-based number of the bad line, the field it breaks or None)."""
    task = draw(st.sampled_from(sorted(TASK_ROWS)))
    rows = draw(st.lists(TASK_ROWS[task], min_size=1, max_size=6))
    ascii_only = draw(st.booleans())
    lines = [_line(r, ascii_only) for r in rows]
    bad = draw(st.integers(0, len(rows) - 1))
    good_line, row = lines[bad], dict(rows[bad])
    kind = draw(st.sampled_from(["truncated", "not_utf8", "not_text", "missing", "not_finite", "surrogate",
                                 "not_object", "bad_choices", "bad_id"]))
    field = None
    if kind == "truncated":
        lines[bad] = good_line[: draw(st.integers(1, len(good_line) - 1))]
    elif kind == "not_utf8":
        at = draw(st.integers(0, len(good_line)))
        junk = draw(st.sampled_from([b"\xff", b"\xc0", b"\x80", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xe2\x82"]))
        lines[bad] = good_line[:at] + junk + good_line[at:]
    elif kind == "not_text":
        field = draw(st.sampled_from(["question", "answer", "rationale"]))
        row[field] = draw(NOT_TEXT)
        lines[bad] = _line(row, ascii_only)
    elif kind == "missing":
        field = draw(st.sampled_from(["question", "answer"] + (["choices"] if task == "csqa" else [])))
        if draw(st.booleans()):
            del row[field]
        else:
            row[field] = draw(st.sampled_from([None, "", "  \t"]))
        lines[bad] = _line(row, ascii_only)
    elif kind == "not_finite":
        field = draw(st.sampled_from(["question", "answer", "rationale"]))
        row[field] = "@@"
        lines[bad] = _line(row, ascii_only).replace(b'"@@"', draw(NOT_FINITE).encode())
    elif kind == "surrogate":
        field = draw(st.sampled_from(["question", "rationale", "id"] + (["choices"] if task == "csqa" else [])))
        lone = "\ud800" if draw(st.booleans()) else "\udfff"
        row[field] = [lone + "x"] * len(row["choices"]) if field == "choices" else "x" + lone
        lines[bad] = json.dumps(row).encode("ascii")  # "\ud800" escapes: valid JSON, not valid Unicode
    elif kind == "not_object":
        lines[bad] = _line(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), texts)), ascii_only)
    elif kind == "bad_choices":
        task, field = "csqa", "choices"
        row = draw(choice_rows)
        row["choices"] = draw(st.one_of(st.just([]), st.lists(texts, min_size=1, max_size=1), st.integers(),
                                        st.lists(st.integers(), min_size=2, max_size=3),
                                        st.lists(texts, min_size=11, max_size=12)))
        lines = [_line(r, ascii_only) for r in draw(st.lists(choice_rows, min_size=bad, max_size=bad))]
        lines.insert(bad, _line(row, ascii_only))
    elif kind == "bad_id":
        field = "id"
        row["id"] = draw(st.one_of(st.booleans(), st.floats(), st.lists(st.integers(), max_size=2), st.just("  ")))
        lines[bad] = _line(row, ascii_only)
    return task, lines, bad + 1, field


@SETTINGS
@given(file_with_one_bad_line())
def test_a_bad_line_is_named_with_its_file_line_and_field(case):
    task, lines, line_no, field = case
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp) / "data.jsonl", lines)
        message = _error(task, path)
    assert message.startswith(f"{path}:{line_no}: "), message
    if field is not None:
        assert f"'{field}'" in message, message


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(sorted(TASK_ROWS)))
@example(b"\xef\xbb\xbf" + b"[" * 100_000, "gsm8k")  # nesting deeper than the recursion limit
@example(b'{"question": "q", "answer": ' + b"9" * 5000 + b"}", "gsm8k")  # past Python's int-from-text limit
@example(b"\x00\x01\x02", "gsm8k")
@example(b"\x1c\n", "gsm8k")  # whitespace to Python's str.strip, not to JSON
def test_random_bytes_load_or_fail_with_the_file_and_a_real_line(data, task):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        try:
            examples = load_examples(task, "file", "train", path=str(path))
        except DataError as e:
            message = str(e)
            assert message.startswith(f"{path}"), message
            where = re.match(re.escape(str(path)) + r":(\d+): ", message)
            if where:  # a line error names a line that exists
                assert 1 <= int(where[1]) <= data.count(b"\n") + 1
            else:
                assert message == f"{path}: no rows" and not data.removeprefix(b"\xef\xbb\xbf").strip(b" \t\r\n")
        else:
            assert examples and all(e.question.strip() and e.answer for e in examples)


@SETTINGS
@given(st.sampled_from(sorted(TASK_ROWS)).flatmap(lambda t: st.tuples(st.just(t), st.lists(TASK_ROWS[t], min_size=1,
                                                                                          max_size=8))),
       st.booleans())
def test_valid_rows_round_trip(case, ascii_only):
    task, rows = case
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp) / "data.jsonl", [_line(r, ascii_only) for r in rows])
        examples = load_examples(task, "file", "train", path=path)
    assert [e.question for e in examples] == [r["question"].strip() for r in rows]
    assert [e.answer for e in examples] == [str(r["answer"]).strip() for r in rows]
    assert [e.uid for e in examples] == [f"{task}/train/{i}" for i in range(1, len(rows) + 1)]


# ---- Parquet


def _parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


# (column type, a bad cell that type can hold); Parquet columns have one type, so a wrong-typed
# column is wrong in every row (test_parquet_wrong_typed_columns)
BAD_CELLS = {
    "question": [(pa.string(), None), (pa.string(), " \t")],
    "answer": [(pa.string(), None), (pa.string(), ""), (pa.string(), "abc"), (pa.int64(), None),
               (pa.float64(), None), (pa.float64(), float("nan")), (pa.float64(), float("-inf"))],
}


@SETTINGS
@given(st.lists(number_rows, min_size=1, max_size=6), st.data())
def test_parquet_bad_cell_is_named_with_its_row_and_field(rows, data):
    bad = data.draw(st.integers(0, len(rows) - 1))
    field = data.draw(st.sampled_from(sorted(BAD_CELLS)))
    arrow_type, value = data.draw(st.sampled_from(BAD_CELLS[field]))
    convert = str if arrow_type == pa.string() else int
    cells = [convert(r[field]) for r in rows]
    cells[bad] = value
    other = "answer" if field == "question" else "question"
    columns = {field: pa.array(cells, type=arrow_type), other: [str(r[other]) for r in rows]}
    with tempfile.TemporaryDirectory() as tmp:
        path = _parquet(Path(tmp) / "data.parquet", columns)
        message = _error("gsm8k", path)
    assert message.startswith(f"{path} row {bad}: field '{field}'"), message


@pytest.fixture
def mixed_types_parquet(tmp_path):
    def make(**columns):
        return _parquet(tmp_path / "data.parquet", columns)
    return make


def test_parquet_wrong_typed_columns(mixed_types_parquet):
    # every cell of a list column is a list: the first row is named
    path = mixed_types_parquet(question=["q1", "q2"], answer=pa.array([[1], [2]]))
    assert _error("gsm8k", path) == f"{path} row 0: field 'answer' must be text, got list"
    path = mixed_types_parquet(question=pa.array([b"q1", b"q2"]), answer=["1", "2"])
    assert _error("gsm8k", path) == f"{path} row 0: field 'question' must be text, got bytes"
    path = mixed_types_parquet(question=["q1", "q2"], answer=[True, False])
    assert _error("gsm8k", path) == f"{path} row 0: field 'answer' must be text, got bool"
    path = mixed_types_parquet(question=["q1", "q2"], answer=["1", "2"], rationale=pa.array([{"a": 1}, {"a": 2}]))
    assert _error("gsm8k", path) == f"{path} row 0: field 'rationale' must be text, got dict"
    path = mixed_types_parquet(question=["q1", "q2"], answer=["1", "2"], id=pa.array([1.5, 2.5]))
    assert _error("gsm8k", path).startswith(f"{path} row 0: field 'id' must be non-empty text or an integer")
    path = mixed_types_parquet(question=["q1", "q2"], answer=["A", "B"], choices=pa.array([[0, 1], [1, 2]]))
    assert _error("csqa", path) == f"{path} row 0: field 'choices' must be a list of at least two option texts"


def test_parquet_missing_columns_duplicate_ids_and_random_bytes(tmp_path):
    path = _parquet(tmp_path / "a.parquet", {"question": ["q"], "text": ["1"]})
    assert _error("gsm8k", path) == f"{path}: field 'answer': no such column (columns: question, text)"
    path = _parquet(tmp_path / "b.parquet", {"question": ["q"], "answer": ["A"]})
    assert _error("csqa", path).startswith(f"{path}: field 'choices': no such column")
    path = _parquet(tmp_path / "c.parquet", {"question": ["q", "r"], "answer": ["1", "2"], "id": ["x", "x"]})
    assert _error("gsm8k", path) == f"{path} row 1: field 'id': 'gsm8k/train/x' was already used at {path} row 0"
    no_text = pa.array([], pa.string())
    path = _parquet(tmp_path / "d.parquet", {"question": no_text, "answer": no_text})
    assert _error("gsm8k", path) == f"{path}: no rows"
    path = tmp_path / "e.parquet"
    path.write_text('{"question": "q", "answer": 1}\n')
    assert _error("gsm8k", str(path)).startswith(f"{path}: not a readable Parquet file")
    good = (tmp_path / "c.parquet").read_bytes()
    path.write_bytes(good[: len(good) // 2] + good[-8:])  # cut in the middle, the footer magic kept
    assert _error("gsm8k", str(path)).startswith(f"{path}: not a readable Parquet file")


@SETTINGS
@given(st.binary(max_size=300))
def test_parquet_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        path.write_bytes(data)
        assert _error("gsm8k", str(path)).startswith(f"{path}: ")


# ---- files that are not files of rows


def test_directory_empty_file_and_unreadable_file(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    assert _error("gsm8k", str(folder)) == f"{folder}: is a directory, expected a .jsonl or .parquet file"
    empty = tmp_path / "empty.jsonl"
    for content in (b"", b"\n\n", b"  \r\n\t\n"):
        empty.write_bytes(content)
        assert _error("gsm8k", str(empty)) == f"{empty}: no rows"
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": 1}\r\n')  # a BOM and Windows line ends are fine
    assert load_examples("gsm8k", "file", "train", path=str(with_bom))[0].answer == "1"


def test_specific_messages(tmp_path):
    def error_of(task, *lines):
        return _error(task, _write(tmp_path / "data.jsonl", [ln.encode("utf-8") if isinstance(ln, str) else ln
                                                                for ln in lines]))
    path = tmp_path / "data.jsonl"
    ok = '{"question": "q", "answer": 1}'
    assert error_of("gsm8k", ok, b'{"question": "caf\xe9", "answer": 1}') == (
        f"{path}:2: not UTF-8 text (byte 0xe9 at column 18)")
    assert error_of("gsm8k", ok, '{"question": "q", "answer": NaN}') == (
        f"{path}:2: field 'answer' must be text or a finite number, got nan")
    assert error_of("gsm8k", '{"question": "q", "answer": "abc"}') == (
        f"{path}:1: field 'answer' must be a number for task 'gsm8k', got 'abc'")
    assert error_of("gsm8k", '{"question": "q\\ud800", "answer": 1}') == (
        f"{path}:1: field 'question' is not valid Unicode (lone surrogate at character 2)")
    assert error_of("gsm8k", '{"id": 7, "question": "q", "answer": 1}', ok,
                    '{"id": "7", "question": "r", "answer": 2}') == (
        f"{path}:3: field 'id': 'gsm8k/train/7' was already used at {path}:1")
    assert error_of("gsm8k", '{"question": "q", "answer": 1', ok).startswith(f"{path}:1: not valid JSON (")
    eleven = json.dumps({"question": "q", "answer": "A", "choices": [str(i) for i in range(11)]})
    assert error_of("csqa", eleven) == f"{path}:1: field 'choices' has 11 options, at most 10 (A-J)"
    assert math.isfinite(float(load_examples("gsm8k", "file", "train", path=_write(path, [ok.encode()]))[0].answer))
