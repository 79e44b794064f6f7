"""Tests for selfrefine_dist.rewards.steps: the running-total step checker (CPU only, a few seconds).

Hand-written paths with the verdict each must get, the bounds, the registry, the teacher's real
chain_sum rationales, and two hypothesis properties: every rationale the programmatic teacher
writes passes, and the same rationale with one total changed never does.
"""
from __future__ import annotations

import dataclasses
import doctest
import importlib.util
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrefine_dist.data.tasks import TASKS, chain_sum_rationale, get_task
from selfrefine_dist.rewards import steps
from selfrefine_dist.rewards.steps import (
    MAX_DIGITS,
    MAX_TEXT_CHARS,
    STEP_CHECKERS,
    STEP_REASONS,
    StepCheck,
    check_steps,
    step_checker,
)

CORRECT = "12 + 7 = 19. 19 - 3 = 16.\nThe answer is 16."

# (text, gold, expected verdict, what the row checks)
CASES = [
    (CORRECT, "16", StepCheck(True, 2, "ok"), "the teacher's own format"),
    ("12+7=19.19-3=16", "16", StepCheck(False, 2, "malformed_step"), "'19.19' is a decimal, not a total and a step"),
    ("12+7=19. 19-3=16. The answer is 16.", "16", StepCheck(True, 2, "ok"), "no spaces around the signs"),
    ("First, 12 + 7 - 3 = 16.\nThe answer is 16.", "16", StepCheck(True, 1, "ok"), "three operands in one step"),
    ("Step 1:12 + 7 = 19\nStep 2: 19 - 3 = 16", "16", StepCheck(True, 2, "ok"), "numbered steps"),
    ("12 + 7 = 19 apples. 19 - 3 = 16 apples.", "16", StepCheck(True, 2, "ok"), "a unit after the total"),
    # lucky: the right final answer through a wrong step
    ("12 + 7 = 18. 18 - 2 = 16.\nThe answer is 16.", "16", StepCheck(False, 2, "wrong_step"),
     "lucky: 12 + 7 is 19, not 18; the later steps are true"),
    ("12 + 7 = 19. 19 - 3 = 17. 17 - 1 = 16.\nThe answer is 16.", "16", StepCheck(False, 3, "wrong_step"),
     "lucky: a wrong middle step"),
    ("12 + 7 - 3 = 15.\nThe answer is 16.", "15", StepCheck(False, 1, "wrong_step"), "a false one-step sum"),
    # the chain must run on
    ("12 + 7 = 19. 20 - 4 = 16.\nThe answer is 16.", "16", StepCheck(False, 2, "chain_broken"),
     "the second step starts from a fresh number"),
    ("12 + 7 = 19. 19 - 3 = 16. 12 + 4 = 16.", "16", StepCheck(False, 3, "chain_broken"),
     "a true step that restarts the chain"),
    # no steps
    ("The answer is 16.", "16", StepCheck(False, 0, "no_steps"), "an answer without work"),
    ("", "16", StepCheck(False, 0, "no_steps"), "empty"),
    ("12 + 7 is 19, minus 3 is 16. The answer is 16.", "16", StepCheck(False, 0, "no_steps"), "steps in words"),
    # the last step must reach the gold
    ("12 + 7 = 19. 19 - 3 = 16.\nThe answer is 15.", "15", StepCheck(False, 2, "last_step_not_answer"),
     "true steps, then a different answer"),
    ("12 + 7 = 19.\nThe answer is 16.", "16", StepCheck(False, 1, "last_step_not_answer"), "stops a step short"),
    # negative numbers
    ("3 - 5 = -2. -2 - -4 = 2.\nThe answer is 2.", "2", StepCheck(True, 2, "ok"), "a negative total, minus a negative"),
    ("So -3 + 5 = 2. 2 - 9 = -7.", "-7", StepCheck(True, 2, "ok"), "a negative first operand and answer"),
    ("3 \u2212 5 = \u22122. \u22122 + 4 = 2.", "2", StepCheck(True, 2, "ok"), "the Unicode minus sign"),
    ("3 - 5 = 2. 2 + 4 = 6.", "6", StepCheck(False, 2, "wrong_step"), "a lost sign"),
    ("3 -5 = -2.", "-2", StepCheck(True, 1, "ok"), "'3 -5' is a subtraction"),
    ("5 - -3 = 2.", "2", StepCheck(False, 1, "wrong_step"), "5 - (-3) is 8, not 2"),
    # malformed: a partial reading would be true, the step as written is not
    ("2 * 12 + 7 = 31.", "31", StepCheck(False, 1, "malformed_step"), "a product before the sum"),
    ("12 + 7 = 19.5", "19", StepCheck(False, 1, "malformed_step"), "a decimal result"),
    ("0.12 + 7 = 7", "7", StepCheck(False, 1, "malformed_step"), "a decimal operand"),
    ("12 + 7 = 19 - 3 = 16.", "16", StepCheck(False, 2, "malformed_step"), "a chained equation claims 19 = 16"),
    ("12 + 7 = 19x.", "19", StepCheck(False, 1, "malformed_step"), "a result glued to a letter"),
    ("x-3 + 5 = 2.", "2", StepCheck(False, 1, "malformed_step"), "a variable"),
    ("x = 16.", "16", StepCheck(False, 1, "malformed_step"), "no sum on the left"),
    ("12 + 7 = 19. Let the total = 19. 19 - 3 = 16.", "16", StepCheck(False, 3, "malformed_step"),
     "an '=' in prose"),
    ("(12 + 7 = 19)", "19", StepCheck(False, 1, "malformed_step"), "parentheses"),
    ("12 + 7 = 1,9.", "19", StepCheck(False, 1, "malformed_step"), "a thousands separator"),
    ("12 + \u0667 = 19.", "19", StepCheck(False, 1, "malformed_step"), "an Arabic-Indic seven"),
    ("12 + 7 == 19.", "19", StepCheck(False, 2, "malformed_step"), "'=='"),
    ("12 + 7 =", "19", StepCheck(False, 1, "malformed_step"), "nothing after '='"),
    ("12 + + 7 = 19.", "19", StepCheck(False, 1, "malformed_step"), "two operators"),
    # huge numbers
    ("1" * 30 + " + 1 = " + "1" * 29 + "2.", "1" * 29 + "2", StepCheck(True, 1, "ok"), "30 digits still count"),
    ("1" * 31 + " + 1 = " + "1" * 30 + "2.", "1" * 29 + "2", StepCheck(False, 1, "number_too_long"),
     "31 digits do not"),
    ("9" * 5000 + " - " + "9" * 5000 + " = 0.", "0", StepCheck(False, 1, "number_too_long"),
     "5,000 digits: never converted (Python refuses int() past 4,300)"),
]


@pytest.mark.parametrize("text, gold, expected, note", CASES, ids=[case[3][:50] for case in CASES])
def test_hand_written_paths(text, gold, expected, note):
    assert check_steps(text, gold) == expected, note


def test_cases_cover_every_reason_but_too_long():
    assert {case[2].reason for case in CASES} == set(STEP_REASONS) - {"too_long"}


def test_long_texts_are_not_read():
    filler = " " * (MAX_TEXT_CHARS - len(CORRECT))
    assert check_steps(filler + CORRECT, "16") == StepCheck(True, 2, "ok")  # exactly at the bound
    assert check_steps("x" + filler + CORRECT, "16") == StepCheck(False, 0, "too_long")
    assert check_steps("1 + 1 = 2. " * 1_000_000, "2") == StepCheck(False, 0, "too_long")


def test_the_worst_text_within_the_bound_is_quick():
    worst = [("1 + " * (MAX_TEXT_CHARS // 4))[: MAX_TEXT_CHARS - 2] + "=1",
             ("= " * MAX_TEXT_CHARS)[:MAX_TEXT_CHARS],
             ("-" * MAX_TEXT_CHARS),
             ("1-" * MAX_TEXT_CHARS)[: MAX_TEXT_CHARS - 3] + "=1",
             "1" * MAX_TEXT_CHARS]
    for text in worst:
        start = time.monotonic()
        assert not check_steps(text, "1").ok
        assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("gold", ["16.0", "sixteen", "", "1" * (MAX_DIGITS + 1), "+16", "1,600"])
def test_a_gold_that_is_no_integer_is_a_value_error(gold):
    with pytest.raises(ValueError, match="gold"):
        check_steps(CORRECT, gold)


def test_gold_may_carry_spaces():
    assert check_steps(CORRECT, " 16\n").ok


def test_step_check_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        check_steps(CORRECT, "16").ok = False


def test_registry():
    assert step_checker("chain_sum") is check_steps
    assert step_checker("chain_sum_long") is check_steps and step_checker("chain_sum_big") is check_steps
    assert step_checker("signed_sum") is None  # innermost group first: no running total
    assert step_checker("gsm8k") is None and step_checker("csqa") is None and step_checker("nonsense") is None
    for task in STEP_CHECKERS:  # only registered tasks whose teacher writes running totals
        offline = get_task(task).offline
        assert offline is not None and offline.generator == "chain_sum", task


def test_docstring_examples():
    failed, attempted = doctest.testmod(steps)
    assert attempted > 0 and failed == 0


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym is not installed")
@pytest.mark.parametrize("task", sorted(STEP_CHECKERS))
def test_the_teachers_real_targets_pass(task):
    from selfrefine_dist.data.sources import load_examples

    spec = TASKS[task]
    examples = load_examples(task, "offline", "validation", limit=100)
    assert len(examples) == 100
    for example in examples:
        target = spec.target_response(example)
        assert check_steps(target, example.answer) == StepCheck(True, target.count("="), "ok"), target


# -- properties ---------------------------------------------------------------------------------

operand = st.integers(min_value=-10**12, max_value=10**12)
chains = st.tuples(operand, st.lists(st.tuples(st.sampled_from("+-"), operand), min_size=1, max_size=12))


def expression_of(first: int, rest: list) -> str:
    return " ".join([str(first)] + [f"{op} {value}" for op, value in rest])


def total_of(first: int, rest: list) -> int:
    total = first
    for op, value in rest:
        total = total + value if op == "+" else total - value
    return total


@settings(max_examples=400, deadline=None)
@given(chains, st.booleans())
def test_the_teachers_rationale_always_passes(chain, with_answer_sentence):
    first, rest = chain
    rationale = chain_sum_rationale(expression_of(first, rest))
    gold = str(total_of(first, rest))
    text = f"{rationale}\nThe answer is {gold}." if with_answer_sentence else rationale
    assert check_steps(text, gold) == StepCheck(True, len(rest), "ok")


@settings(max_examples=400, deadline=None)
@given(chains, st.data())
def test_one_corrupted_total_always_fails(chain, data):
    """Change one total of the teacher's text, where a step states it ("= r") or where the next step
    carries it on ("r + b"); the rest of the text, the final answer sentence included, stays."""
    first, rest = chain
    gold = str(total_of(first, rest))
    step_texts = chain_sum_rationale(expression_of(first, rest)).split(". ")
    index = data.draw(st.integers(0, len(step_texts) - 1), label="step")
    delta = data.draw(st.integers(1, 10**6), label="size") * data.draw(st.sampled_from([1, -1]), label="sign")
    left, _, result = step_texts[index].rstrip(".").partition(" = ")
    where = data.draw(st.sampled_from(["result", "carried"] if index > 0 else ["result"]), label="where")
    if where == "result":
        step_texts[index] = f"{left} = {int(result) + delta}"
    else:  # the running total this step starts from
        carried, op, operand_text = left.split(" ")
        step_texts[index] = f"{int(carried) + delta} {op} {operand_text} = {result}"
    corrupted = ". ".join(step.rstrip(".") for step in step_texts) + f".\nThe answer is {gold}."
    verdict = check_steps(corrupted, gold)
    assert not verdict.ok
    assert verdict.reason == "wrong_step"  # the corrupted equation is false as written


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-=. \n-x\u2212")), max_size=300))
def test_any_text_gets_a_verdict_never_an_exception(text):
    verdict = check_steps(text, "7")
    assert verdict.reason in STEP_REASONS
    assert verdict.ok == (verdict.reason == "ok")
    assert verdict.equations == text.count("=")
