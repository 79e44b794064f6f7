"""Property tests for the reward checker: no reward for an answer it cannot read whole and plainly
(CPU only, about a minute).

Completions are generated around a gold answer so that it is known whether they state it plainly:
long digit runs that contain the gold, answers cut by a window (the tail, the span after a marker,
an unclosed box), nested LaTeX whose value is not the gold, Unicode digits, confusable letters and
invisible characters, mixed option letters, megabyte strings and control characters. For every one:
never correct unless the gold is stated plainly, never an exception, and never slower than the
checker's timeout plus a small margin. Plain statements buried in the same junk are checked to
score correct, so that the checker cannot pass by refusing everything.
"""
from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfrefine_dist.rewards import REASONS, RewardResult, check_answer
from selfrefine_dist.rewards.extract import MAX_DIGITS, SPAN_CHARS, TAIL_CHARS
from selfrefine_dist.rewards.math_process import KILL_GRACE_S, shared_math_process

TIMEOUT_S = 1.0
# Tests that expect an exact verdict give math-verify more time: on a loaded machine a freshly
# restarted helper's first LaTeX parse can take a second, and a timeout there is no finding.
EXACT_TIMEOUT_S = 10.0
# On top of the timeout and the helper's kill grace: regex work on megabytes, a loaded machine.
MARGIN_S = 2.0
# Examples per property; raise it for a longer search (REWARD_PROPERTY_EXAMPLES=2000).
EXAMPLES = int(os.environ.get("REWARD_PROPERTY_EXAMPLES", "150"))
CHOICES = ["bank", "library", "department store", "mall", "new york"]
LETTERS = "ABCDE"


@pytest.fixture(scope="module", autouse=True)
def started_helper():
    """math-verify's helper starts once (about a second, not counted against any timeout)."""
    shared_math_process().start()


def judge(completion: str, gold: str, answer_type: str = "number", timeout_s: float = TIMEOUT_S) -> RewardResult:
    """check_answer, which must return a verdict (no exception) within the time bound."""
    start = time.monotonic()
    result = check_answer(completion, gold, answer_type, CHOICES if answer_type == "choice" else None,
                          timeout_s=timeout_s)
    seconds = time.monotonic() - start
    assert seconds < timeout_s + KILL_GRACE_S + MARGIN_S, (completion[:80], seconds)
    assert result.reason in REASONS and result.correct == (result.reason == "correct")
    return result


def not_correct(completion: str, gold: str, answer_type: str = "number") -> RewardResult:
    result = judge(completion, gold, answer_type)
    assert not result.correct, (completion[:200], len(completion), gold, result)
    return result


golds = st.integers(0, 999).map(str)
nonzero_digit = st.sampled_from("123456789")
digit_runs = st.builds(lambda first, rest: first + "".join(rest), nonzero_digit,
                       st.lists(st.sampled_from("0123456789"), max_size=40))
# Text that holds no digit and no marker: words, punctuation, spaces.
prose = st.text(alphabet=st.sampled_from(list("abcdefghij klmnop,;:-'\"()")), max_size=60)


def megabyte_filler(piece: str, repeats: int) -> str:
    return piece * repeats


fillers = st.builds(megabyte_filler, st.sampled_from(["lorem ipsum ", "x", "( ", "$ ", "* ", "\u2603 ", "\u0416\u4e2d "]),
                    st.integers(1, 120_000))
frames = st.sampled_from(["{}", "The answer is {}.", "So the answer is {}", "\\boxed{{{}}}", "#### {}",
                          "Answer: {}", "The answer is ${}$.", "We get {} in the end"])


# -- numbers --------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, st.one_of(st.just(""), digit_runs), digit_runs.map(lambda run: run[:1]) | digit_runs,
       st.integers(0, 6000), frames, prose)
def test_a_digit_run_that_contains_the_gold_is_not_the_gold(gold, prefix, suffix, padding, frame, before):
    """"19", "91", "1999...9": the gold's digits inside a longer number; from 31 digits on also
    cut by the number pattern or the span, from 4,000 by the tail."""
    run = prefix + gold + suffix + "0" * padding
    not_correct(before + " " + frame.format(run), gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, st.integers(MAX_DIGITS + 1, 3 * TAIL_CHARS), st.sampled_from("0123456789"), frames)
def test_a_run_of_one_digit_is_never_a_short_gold(gold, length, digit, frame):
    """The bug: 5,000 nines were read, in the tail, as the number "9"."""
    not_correct(frame.format(digit * length), gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, golds, st.integers(0, 2 * SPAN_CHARS), st.sampled_from(["or", "or maybe", "(or", "and/or", ",", ";", "to",
                                                                       "\\pm", "\u00b1", "", "/ or"]))
def test_an_answer_with_an_alternative_is_never_correct_however_far_the_alternative(gold, other, spaces, joiner):
    """Near, the alternative makes it ambiguous; past ``SPAN_CHARS`` the span is cut."""
    if other == gold:
        other = str(int(gold) + 1)
    not_correct(f"The answer is {gold}{' ' * spaces} {joiner} {other}.", gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, golds, st.sampled_from(["and", "x", ":", "|", ">", "<", "~", "\\\\", "out of", "by", "'", "#", "@"]),
       st.sampled_from(["The answer is {}.", "{}", "\\boxed{{{}}}", "#### {}"]))
def test_two_numbers_that_math_verify_would_read_as_the_first_are_never_correct(gold, other, joiner, frame):
    """"9 and 10", "9 x 10", "9:10", "9 > 8": math-verify reads the first number and ignores the rest
    (without a marker the last number is read, and "9 x 9" must not pass as 9 either)."""
    spaced_other = other
    if other == gold and frame == "{}" and joiner not in ("and", "x", "by", "\\\\", "|", "~"):
        spaced_other = str(int(gold) + 1)  # "9 > 9", "9 : 9" without a marker: the last 9, standalone, is read
    not_correct(frame.format(f"{gold} {joiner} {spaced_other}"), gold)
    not_correct(frame.format(f"{gold}{joiner}{other}"), gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, st.sampled_from(["not {}", "at least {}", "at most {}", "about {}", "approximately {}", "{} or more",
                               "{} or so", "more than {}", "nearly {}", "{} thousand", "{}k", "{} (roughly)", "{}?",
                               "maybe {}", "negative {}", "minus {}", "{} at most"]),
       st.sampled_from(["The answer is {}.", "\\boxed{{{}}}", "#### {}", "Answer: {}"]))
def test_a_bound_an_estimate_or_a_negation_is_never_correct(gold, qualified, frame):
    not_correct(frame.format(qualified.format(gold)), gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, golds, st.integers(TAIL_CHARS, 3 * TAIL_CHARS), st.sampled_from(["The answer is {}.", "\\boxed{{{}}}",
                                                                              "#### {}"]))
def test_a_marked_answer_out_of_reach_is_not_replaced_by_a_number_in_the_tail(gold, stated, filler, frame):
    """The completion answers ``stated``; far after it, the gold is the last number of the text."""
    not_correct(frame.format(stated) + " lorem" * (filler // 6) + f" and {gold} more", gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, st.integers(SPAN_CHARS, 3 * SPAN_CHARS), st.sampled_from([" ", "0", "x", "{"]))
def test_an_unclosed_box_is_never_read(gold, length, fill):
    not_correct(f"The answer is \\boxed{{{gold}{fill * length}", gold)
    not_correct(f"\\boxed{{{gold}{fill * length}", gold)


# Wrappers whose value exceeds x for every x >= 2, so no nesting of them equals the gold.
INCREASING = ["{x}+1", "2\\cdot {x}", "({x})^{{2}}", "\\frac{{{x}}}{{1}}+1", "\\left({x}\\right)+1", "{{{x}}}+1"]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(2, 999).map(str), st.lists(st.sampled_from(INCREASING), min_size=1, max_size=3),
       st.sampled_from(["{}", "The answer is {}.", "The answer is ${}$.", "\\boxed{{{}}}", "So we get $${}$$"]))
def test_nested_latex_around_the_gold_is_not_the_gold(gold, wrappers, frame):
    expression = gold
    for wrapper in wrappers:
        expression = wrapper.format(x=expression)
    not_correct(frame.format(expression), gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(2, 999).map(str), st.integers(0, 4).map(lambda n: 2 * n + 1),
       st.sampled_from(["{}", "The answer is {}.", "\\boxed{{{}}}"]))
def test_odd_nested_fractions_are_one_over_the_gold(gold, depth, frame):
    """\\frac{1}{\\frac{1}{\\frac{1}{g}}} is 1/g; its innermost piece \\frac{1}{g} or g must not
    be read as the answer."""
    not_correct(frame.format("\\frac{1}{" * depth + gold + "}" * depth), gold)


UNICODE_DIGITS = [0xFF10, 0x0660, 0x06F0, 0x0966, 0x09E6, 0x1D7CE, 0x1D7EC, 0x1D7F6, 0x2080]
SUPERSCRIPTS = "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079"
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u202e", "\u0301", "\u20e3", "\x00", "\x1b",
             "\x1c", "\x1f", "\x85", "\u2028", "\u00a0", "\u2009", "\ud800", "\U000e0001"]


def disguise(gold: str, families: list, positions: list, invisible: list) -> str:
    """The gold with some digits from other scripts (0 -> a family's zero, or a superscript)
    and invisible characters slipped in."""
    digits = []
    for digit, family in zip(gold, families + [None] * len(gold)):
        if family is None:
            digits.append(digit)
        elif family == "super":
            digits.append(SUPERSCRIPTS[int(digit)])
        else:
            digits.append(chr(family + int(digit)))
    text = "".join(digits)
    for position, character in zip(positions, invisible):
        position %= len(text) + 1
        text = text[:position] + character + text[position:]
    return text


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, st.lists(st.sampled_from(UNICODE_DIGITS + ["super", None]), max_size=3),
       st.lists(st.integers(0, 3), max_size=3), st.lists(st.sampled_from(INVISIBLE), max_size=3), frames)
def test_other_digits_and_invisible_characters_are_not_the_gold(gold, families, positions, invisible, frame):
    disguised = disguise(gold, families, positions, invisible)
    if disguised == gold:
        return  # nothing was changed: a plain statement (checked below)
    not_correct(frame.format(disguised), gold)


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, fillers, prose, st.sampled_from(["The answer is {}.", "The answer is {}", "#### {}", "\\boxed{{{}}}",
                                               "The final answer is: **{}**", "Answer: ${}$"]))
def test_a_plain_statement_after_any_junk_is_correct(gold, filler, words, frame):
    result = judge(f"{filler}\n{words} {frame.format(gold)}", gold, timeout_s=EXACT_TIMEOUT_S)
    assert result.correct, result


@settings(max_examples=EXAMPLES, deadline=None)
@given(golds, st.lists(st.sampled_from(["1", "9", " ", "=", "+", "-", ".", ",", "$", "\\boxed{", "}", "{", "^", "(", ")",
                                        "The answer is ", "\n", "\x00", "\ud800", "\u202e", "\u0301", "\uff19", "A", "or",
                                        "\\frac{1}{", "%", "#### ", "e", "!"]),
                       max_size=40),
       st.integers(1, 30_000))
def test_any_soup_of_answer_pieces_gets_a_verdict_in_time(gold, pieces, repeats):
    """No property of correctness here: megabyte soups must simply be judged, in time."""
    soup = "".join(pieces)
    judge(soup * (repeats if len(soup) * repeats <= 1_000_000 else 1), gold)


# -- multiple choice ---------------------------------------------------------------------------------

gold_letters = st.sampled_from(LETTERS)
CONFUSABLE = {"A": ["\u0410", "\u0391", "\uff21", "\U0001d400", "\u1d00"], "B": ["\u0412", "\u0392", "\uff22", "\U0001d401"],
              "C": ["\u0421", "\u216d", "\uff23", "\U0001d402", "\u03f9"], "D": ["\u216e", "\uff24", "\U0001d403"],
              "E": ["\u0415", "\u0395", "\uff25", "\U0001d404"]}


def other_letter(gold: str, index: int) -> str:
    others = [letter for letter in LETTERS if letter != gold]
    return others[index % len(others)]


@settings(max_examples=EXAMPLES, deadline=None)
@given(gold_letters, st.integers(0, 3), st.sampled_from([" or ", " and/or ", "/", ", ", " (or ", " or maybe ", " and ",
                                                         " & ", ", not ", ", since ", " vs ", "", " or option "]),
       st.sampled_from(["{g}", "({g})", "option {g}", "{g})", "\\boxed{{{g}}}"]),
       st.sampled_from(["The answer is {}.", "Answer: {}", "{}", "The answer is: {}", "#### {}"]),
       st.integers(0, 2 * SPAN_CHARS))
def test_an_answer_that_names_two_options_is_never_correct(gold, index, joiner, form, frame, spaces):
    other = other_letter(gold, index)
    answer = form.format(g=gold) + " " * spaces + joiner + form.format(g=other)
    not_correct(frame.format(answer), gold, "choice")


@settings(max_examples=EXAMPLES, deadline=None)
@given(gold_letters, st.data(), st.sampled_from(["The answer is {}.", "Answer: ({})", "{}", "\\boxed{{{}}}"]),
       st.lists(st.integers(0, 2), max_size=2), st.lists(st.sampled_from(INVISIBLE), max_size=2))
def test_confusable_letters_and_invisible_characters_are_no_option(gold, data, frame, positions, invisible):
    letter = data.draw(st.sampled_from(CONFUSABLE[gold] + ([gold] if invisible else [])), label="letter")
    for position, character in zip(positions, invisible):
        position %= len(letter) + 1
        letter = letter[:position] + character + letter[position:]
    if letter == gold:
        return
    not_correct(frame.format(letter), gold, "choice")


@settings(max_examples=EXAMPLES, deadline=None)
@given(gold_letters, st.integers(0, 3), st.integers(TAIL_CHARS, 3 * TAIL_CHARS))
def test_a_choice_out_of_reach_is_not_replaced_by_a_line_in_the_tail(gold, index, filler):
    other = other_letter(gold, index)
    not_correct(f"The answer is {other}." + " lorem" * (filler // 6) + f"\n{gold}", gold, "choice")


@settings(max_examples=EXAMPLES, deadline=None)
@given(gold_letters, st.integers(0, 3), st.integers(0, 3 * SPAN_CHARS))
def test_a_first_or_last_line_cut_by_its_window_is_not_read(gold, index, spaces):
    """Short, the line names two options; long, the window cuts it and it cannot be read, nor may
    the other edge line decide alone."""
    other = other_letter(gold, index)
    not_correct(gold + " " * spaces + " or " + other, gold, "choice")
    not_correct(f"{gold}\nlorem ipsum\n" + f"{other} or " * (spaces // 5) + other, gold, "choice")
    not_correct(f"{other} or " * (spaces // 5) + f"{other}\nlorem ipsum\n{gold}", gold, "choice")


@settings(max_examples=EXAMPLES, deadline=None)
@given(gold_letters, fillers, prose, st.sampled_from(["The answer is {}.", "The answer is ({}).", "Answer: {}",
                                                      "\\boxed{{{}}}", "The correct option is {}."]))
def test_a_plain_choice_after_any_junk_is_correct(gold, filler, words, frame):
    result = judge(f"{filler}\n{words}\n{frame.format(gold)}", gold, "choice", timeout_s=EXACT_TIMEOUT_S)
    assert result.correct, result


# -- the false positives this suite was written against, by hand ------------------------------------

# (completion, gold, answer type, expected verdict): each scored correct before the fix (commit 48743e1).
FALSE_POSITIVES = [
    ("9" * 5000, "9", "number", RewardResult(False, "9", "parse_failure")),
    ("The answer is 7." + " lorem 9" * 1000, "9", "number", RewardResult(False, None, "no_answer")),
    ("\\boxed{" + "0" * 300 + "9}", "9", "number", RewardResult(False, "0" * SPAN_CHARS, "parse_failure")),
    ("The answer is 9 or 10.", "9", "number", RewardResult(False, "9 or 10", "wrong")),
    ("The answer is 9, 10", "9", "number", RewardResult(False, "9, 10", "wrong")),
    ("The answer is 9 9", "9", "number", RewardResult(False, "9 9", "wrong")),
    ("The answer is 9" + " " * 400 + "or 10", "9", "number", RewardResult(False, "9", "parse_failure")),
    ("The answer is 9!", "9", "number", RewardResult(False, "9!", "parse_failure")),
    ("The answer is 1e100", "1", "number", RewardResult(False, "1e100", "parse_failure")),
    ("The answer is 9\u200b0", "9", "number", RewardResult(False, "9\u200b0", "parse_failure")),
    ("The answer is 9\u0301", "9", "number", RewardResult(False, "9\u0301", "parse_failure")),
    ("The answer is 9}", "9", "number", RewardResult(False, "9}", "parse_failure")),
    ("The answer is \\frac{1}{\\frac{1}{2}}", "0.5", "number", RewardResult(False, "\\frac{1}{\\frac{1}{2}}", "wrong")),
    ("The answer is 9^{2}", "9", "number", RewardResult(False, "9^{2}", "wrong")),
    ("\\frac{1}{\\frac{1}{2}}", "0.5", "number", RewardResult(False, "\\frac{1}{2}", "parse_failure")),
    ("The total is 2^9", "9", "number", RewardResult(False, "9", "parse_failure")),
    ("x9", "9", "number", RewardResult(False, "9", "parse_failure")),
    ("The probability is .5", "5", "number", RewardResult(False, "5", "parse_failure")),
    ("The answer is A and/or B.", "A", "choice", RewardResult(False, "A,B", "wrong")),
    ("The answer is A (or maybe B).", "A", "choice", RewardResult(False, "A,B", "wrong")),
    ("The answer is A" + " " * 400 + "or B", "A", "choice", RewardResult(False, "A", "parse_failure")),
    ("B" + " " * 299 + "is what I would rule out.", "B", "choice", RewardResult(False, None, "no_answer")),
    ("The answer is A." + " lorem" * 1000 + "\nB", "B", "choice", RewardResult(False, None, "no_answer")),
    ("The answer is \x1cB.", "B", "choice", RewardResult(False, "B", "parse_failure")),
    ("The answer is 9 and 10.", "9", "number", RewardResult(False, "9 and 10", "wrong")),
    ("The answer is 9 x 10.", "9", "number", RewardResult(False, "9 x 10", "wrong")),
    ("The answer is 9:10.", "9", "number", RewardResult(False, "9:10", "wrong")),
    ("The answer is 9 > 8.", "9", "number", RewardResult(False, "9 > 8", "wrong")),
    ("The answer is 9 thousand.", "9", "number", RewardResult(False, "9 thousand", "wrong")),
    ("The answer is at least 9.", "9", "number", RewardResult(False, "at least 9", "wrong")),
    ("The answer is not 9.", "9", "number", RewardResult(False, "not 9", "wrong")),
    ("The answer is 9 (approximately).", "9", "number", RewardResult(False, "9 (approximately)", "wrong")),
    ("The answer is 9\nor 10", "9", "number", RewardResult(False, "9", "wrong")),
    ("\\boxed{\\boxed{9} + 1}", "9", "number", RewardResult(False, "\\boxed{9} + 1", "parse_failure")),
    ("The answer is B; C.", "B", "choice", RewardResult(False, "B,C", "wrong")),
    ("The answer is B\nor C", "B", "choice", RewardResult(False, "B", "parse_failure")),
    ("The answer is B or not B.", "B", "choice", RewardResult(False, "B or not B", "parse_failure")),
    ("The answer is library (bank?).", "B", "choice", RewardResult(False, "library (bank?)", "parse_failure")),
]


@pytest.mark.parametrize("completion, gold, answer_type, expected", FALSE_POSITIVES,
                         ids=[f"{i:02d}" for i in range(len(FALSE_POSITIVES))])
def test_known_false_positives_stay_fixed(completion, gold, answer_type, expected):
    assert judge(completion, gold, answer_type, EXACT_TIMEOUT_S) == expected


@pytest.mark.parametrize("completion, gold", [
    ("The answer is 9 apples.", "9"), ("The answer is 1 234.", "1234"), ("The answer is 9, since 4 + 5 = 9.", "9"),
    ("The answer is 3^2.", "9"), ("The answer is $\\frac{1}{\\frac{1}{2}}$.", "2"), ("x = 9", "9"),
    ("We get 18cm of rope", "18"), ("The answer is $\\sqrt{81}$.", "9"),
])
def test_plain_statements_near_those_still_count(completion, gold):
    assert judge(completion, gold, timeout_s=EXACT_TIMEOUT_S).correct
