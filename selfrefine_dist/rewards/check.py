"""Judge a completion's final answer against the gold answer: the reward of a sampled path.

Two answer types:
- "number": numbers and math expressions. ``extract.find_number_answer`` locates the stated
  answer ("The answer is 18.", "#### 18", "\\boxed{18}", else the last number-like expression);
  math-verify, in a helper process that is killed if it overruns ``timeout_s``, parses it and
  compares it with the gold ("1,234" = "1234", "18.0" = "18", "$18" = "18", "\\frac{1}{2}" = "0.5").
- "choice": multiple choice. ``choice.read_choice_answer`` finds the option letters (or option
  texts) the final answer names; one option equal to the gold is correct, several are wrong.

    >>> check_answer("9 * 2 = 18 dollars a day. The answer is $18.", "18", "number")
    RewardResult(correct=True, extracted='$18', reason='correct')
    >>> check_answer("The answer is 18.5.", "18", "number").reason
    'wrong'
    >>> check_answer("The answer is (B) pencil.", "b", "choice", ["pen", "pencil", "ink"]).score
    1.0
    >>> check_answer("The answer is A or B.", "B", "choice", ["pen", "pencil", "ink"])
    RewardResult(correct=False, extracted='A,B', reason='wrong')
    >>> check_answer("I do not know.", "B", "choice", ["pen", "pencil", "ink"]).reason
    'no_answer'

No false positives: an answer is correct only when it is read whole and plainly. One cut by any
window (the tail, the span after a marker, an unclosed box, a digit run past the pattern's
limits), longer than ``extract.MAX_DIGITS`` digits, written with other digits or confusables,
malformed ("9!", "1e100", "x9", "9}") or a piece of a larger expression is a "parse_failure";
one that offers alternatives ("9 or 10", "A (or B)") is "wrong". A completion whose only markers
lie before the tail has "no_answer": its answer is out of reach, and no number read in the tail
stands in for it. See ``extract.answer_problem`` and ``choice.read_choice_answer``.

    >>> check_answer("The answer is " + "9" * 300 + ".", "9", "number").reason  # cut at SPAN_CHARS
    'parse_failure'
    >>> check_answer("9" * 5000, "9", "number").reason  # cut by the tail and the number pattern
    'parse_failure'
    >>> check_answer("The answer is 9 or 10.", "9", "number")
    RewardResult(correct=False, extracted='9 or 10', reason='wrong')

Bounded time: only the last ``extract.TAIL_CHARS`` characters of a completion are read (and the
text before them only by a literal scan for markers, milliseconds per megabyte), choices are read
with plain string work on at most a few hundred characters, and math-verify runs under a
deadline enforced by killing its process, which works from any thread. Nothing evaluates model
output.
"""
from __future__ import annotations

import logging
import math
import string
from dataclasses import dataclass
from typing import Sequence

from .choice import option_letters, read_choice_answer
from .extract import SPAN_CHARS, find_number_answer
from .math_process import shared_math_process

ANSWER_TYPES = ("number", "choice")
REASONS = ("correct", "wrong", "no_answer", "parse_failure", "timeout")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one completion.

    correct: whether its final answer equals the gold.
    extracted: the final answer found in the completion, as text (at most 200 characters): for
        numbers the answer stated after the marker ("$18", "1,234 apples"), or the last
        number-like expression when there is no marker; for choices the option letter ("B"),
        the letters of an ambiguous answer ("A,C"), or the stated text when it names no option.
        None when no answer was found.
    reason: "correct"; "wrong" (a different or ambiguous answer); "no_answer" (nothing to
        check, or the only markers out of reach before the tail); "parse_failure" (an answer was
        stated but is not a number, expression or option that can be read whole: cut by a
        window, too long, malformed); "timeout" (math-verify overran ``timeout_s``).
    """

    correct: bool
    extracted: str | None
    reason: str

    @property
    def score(self) -> float:
        """The reward: 1.0 if correct, else 0.0."""
        return 1.0 if self.correct else 0.0


def _printable(text: str | None) -> str | None:
    """At most ``SPAN_CHARS`` characters, lone surrogates replaced: safe to log and to encode."""
    if text is None:
        return None
    return text[:SPAN_CHARS].encode("utf-8", "replace").decode("utf-8")


def extract_gsm8k_gold(answer_field: str) -> str:
    """The gold answer of a GSM8K ``answer`` field: the text after its last '####', commas gone.

    >>> extract_gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\\n#### 1,234")
    '1234'
    """
    _, marker, gold = answer_field.rpartition("####")
    if not marker:
        raise ValueError(f"GSM8K answer field has no '####' line: {answer_field[-200:]!r}")
    gold = gold.strip().replace(",", "")
    if not gold:
        raise ValueError(f"GSM8K answer field has nothing after '####': {answer_field[-200:]!r}")
    return gold


def check_answer(
    completion: str | None,
    gold: str,
    answer_type: str,
    choices: Sequence[str] | None = None,
    *,
    timeout_s: float = 2.0,
) -> RewardResult:
    """Judge ``completion``'s final answer against ``gold``.

    answer_type: "number" (numeric answers and math expressions, checked with math-verify) or
        "choice" (gold is an option letter "A".."E", any case; ``choices`` are the option texts in
        order, so that an answer given as an option's text counts too).
    timeout_s: the most math-verify may spend on one answer ("number" only; reading choices is
        plain bounded string work). The first "number" call of a process also waits about a
        second for math-verify's helper process to start.
    A None completion counts as empty. Raises ValueError for an unknown answer_type, a gold that
    is no option letter, a number gold that math-verify cannot parse (found out when there is an
    answer to compare it with), or a timeout_s that is not a positive number.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    completion = "" if completion is None else completion
    if not isinstance(completion, str) or not isinstance(gold, str):
        raise TypeError("completion and gold must be strings")
    if answer_type == "number":
        return _check_number(completion, gold, timeout_s)
    return _check_choice(completion, gold, choices)


def _check_number(completion: str, gold: str, timeout_s: float) -> RewardResult:
    if not gold.strip():
        raise ValueError("gold answer is empty")
    answer = find_number_answer(completion)
    if answer is None:
        return RewardResult(False, None, "no_answer")
    extracted = _printable(answer.text)
    if answer.problem == "ambiguous":  # alternatives offered: hedging must not earn a reward
        return RewardResult(False, extracted, "wrong")
    if answer.problem is not None:  # cut, too long or malformed: not an answer we can read
        return RewardResult(False, extracted, "parse_failure")
    reply = shared_math_process().compare(answer.math_text, gold, timeout_s)
    if reply is None:
        return RewardResult(False, extracted, "timeout")
    if "error" in reply or "crashed" in reply:  # math-verify broke on this answer: no reward
        logger.warning("math-verify failed on %r against gold %r: %s", extracted, gold, reply)
        return RewardResult(False, extracted, "parse_failure")
    if not reply["gold_parsed"]:
        raise ValueError(f"gold answer {gold!r} is not a number or expression math-verify can parse")
    if not reply["answer_parsed"]:
        return RewardResult(False, extracted, "parse_failure")
    if reply["equal"]:
        return RewardResult(True, extracted, "correct")
    return RewardResult(False, extracted, "wrong")


def _check_choice(completion: str, gold: str, choices: Sequence[str] | None) -> RewardResult:
    if choices is not None and not 1 <= len(choices) <= len(string.ascii_uppercase):
        raise ValueError(f"expected 1 to 26 options, got {len(choices)}")
    letters = option_letters(choices)
    gold_letter = gold.strip().upper()
    if len(gold_letter) != 1 or gold_letter not in letters:
        raise ValueError(f"gold {gold!r} is not one of the option letters {', '.join(letters)}")
    answer = read_choice_answer(completion, choices)
    if answer.stated is None:
        return RewardResult(False, None, "no_answer")
    if not answer.letters:
        return RewardResult(False, _printable(answer.stated), "parse_failure")
    if len(answer.letters) > 1:
        return RewardResult(False, ",".join(sorted(answer.letters)), "wrong")
    (letter,) = answer.letters
    return RewardResult(letter == gold_letter, letter, "correct" if letter == gold_letter else "wrong")
