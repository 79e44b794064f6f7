"""Check the intermediate steps of a running-total path (chain_sum): plain token work, no eval.

chain_sum's teacher writes one equation per step, each starting from the previous total:

    12 + 7 = 19. 19 - 3 = 16.
    The answer is 16.

``check_steps`` reads every ``=`` of a completion as one equation ``a (+|-) b (+|- c ...) = r``
of integers (a number may carry a leading minus: "5 - -3 = 8", "3 - 5 = -2") and accepts the path
only if all of these hold:

1. there is at least one equation;
2. every ``=`` belongs to a well-formed integer equation: at least two operands joined by ``+`` or
   ``-`` on the left, one integer on the right, nothing mathematical glued to either side
   ("2 * 12 + 7 = 31", "12 + 7 = 19.5", "x = 4", "12 + 7 = 19 - 3 = 16" are malformed: a partial
   reading of them could look true when the step as written is not);
3. every equation is arithmetically true;
4. every equation after the first starts from the previous equation's result (a running total;
   one that starts from a fresh number breaks the chain);
5. the last equation's result is the gold answer.

When in doubt, the path fails: an ``=`` in prose ("where x = apples"), decimals, thousands
separators, Unicode digits and any operator other than ``+``/``-`` make it fail too. The checker is
meant for chain_sum-style paths only (``STEP_CHECKERS`` names the tasks).

Bounded work: texts over ``MAX_TEXT_CHARS`` characters and numbers over ``MAX_DIGITS`` digits fail
without being converted; the rest is one linear tokenizing pass and one pass over the tokens.

    >>> check_steps("12 + 7 = 19. 19 - 3 = 16.\\nThe answer is 16.", "16")
    StepCheck(ok=True, equations=2, reason='ok')
    >>> check_steps("12 + 7 = 20. 20 - 4 = 16.\\nThe answer is 16.", "16")
    StepCheck(ok=False, equations=2, reason='wrong_step')
    >>> check_steps("12 + 7 = 19. 20 - 4 = 16.\\nThe answer is 16.", "16").reason
    'chain_broken'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

# chain_sum paths are a few hundred characters; far longer text is not a path worth reading.
MAX_TEXT_CHARS = 20_000
# chain_sum numbers have 1-2 digits; a 30-digit one is junk, and int() of a huge run is costly
# (and refused by Python past 4,300 digits).
MAX_DIGITS = 30

STEP_REASONS = ("ok", "no_steps", "malformed_step", "wrong_step", "chain_broken", "last_step_not_answer",
                "too_long", "number_too_long")

# One token per match; whitespace is skipped but remembered through the tokens' positions.
# DEC ("19.5", "1,234") comes before INT so that a decimal is never read as its integer part.
_TOKEN = re.compile(
    r"(?P<dec>[0-9]+(?:[.,][0-9]+)+)"
    r"|(?P<int>[0-9]+)"
    r"|(?P<op>[+\-\u2212])"
    r"|(?P<eq>=)"
    r"|(?P<space>\s+)"
    r"|(?P<word>[^\W\d_]+)"
    r"|(?P<punct>[.,:;!?])"
    r"|(?P<other>.)",
    re.DOTALL,
)
_GOLD = re.compile(r"-?[0-9]{1,%d}" % MAX_DIGITS)
# Punctuation that may touch the first operand of an equation ("Step 1:12 + 7 = 19").
_ATTACHABLE_PUNCT = frozenset(":;,!?")


@dataclass(frozen=True)
class StepCheck:
    """The verdict on a path's steps.

    ok: every step is a true integer equation continuing the running total, and the last
        step's result is the gold answer.
    equations: how many ``=`` the path has (each one a step, well-formed or not); 0 for a text
        over the length bound, which is not read.
    reason: "ok", or the first problem in reading order: "malformed_step", "number_too_long",
        "wrong_step", "chain_broken"; then "no_steps" (no ``=`` at all) or "last_step_not_answer";
        "too_long" for a text over ``MAX_TEXT_CHARS``.
    """

    ok: bool
    equations: int
    reason: str


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class _Equation:
    """operands[0] op[0] operands[1] op[1] ... = result, as digit strings with signs."""

    operands: Tuple[Tuple[bool, str], ...]  # (negative, digits)
    ops: Tuple[str, ...]
    result: Tuple[bool, str]


class _Malformed(Exception):
    pass


def _tokens(text: str) -> List[_Token]:
    out = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "space":
            continue
        token_text = match.group(0)
        if kind == "op":
            token_text = "-" if token_text == "\u2212" else token_text
        out.append(_Token(kind, token_text, match.start(), match.end()))
    return out


def _attached(left: _Token, right: _Token) -> bool:
    return left.end == right.start


def _is_minus(token: _Token) -> bool:
    return token.kind == "op" and token.text == "-"


def _sign_at(tokens: List[_Token], j: int) -> bool:
    """Whether the minus at ``j`` (attached to the number after it) is that number's sign rather
    than a subtraction: it is when nothing that could be a left operand stands before it."""
    if j == 0:
        return True
    before = tokens[j - 1]
    if before.kind in ("op", "eq"):
        return True
    return before.kind in ("word", "punct") and not _attached(before, tokens[j])


def _read_left(tokens: List[_Token], eq_index: int) -> Tuple[Tuple[Tuple[bool, str], ...], Tuple[str, ...]]:
    """The operands and operators just before the ``=`` at ``eq_index``, read backwards."""
    operands: List[Tuple[bool, str]] = []
    ops: List[str] = []
    j = eq_index - 1
    while True:
        if j < 0 or tokens[j].kind != "int":
            raise _Malformed
        number = tokens[j]
        j -= 1
        negative = False
        if j >= 0 and _is_minus(tokens[j]) and _attached(tokens[j], number) and _sign_at(tokens, j):
            negative = True
            j -= 1
        operands.append((negative, number.text))
        if j >= 0 and tokens[j].kind == "op":
            ops.append(tokens[j].text)
            j -= 1
            continue
        break
    if len(operands) < 2:
        raise _Malformed
    first = tokens[j + 1]
    if j >= 0:  # what stands before the equation must not be part of some larger expression
        before = tokens[j]
        fine = before.kind == "word" or before.kind == "punct"
        if _attached(before, first) and not (before.kind == "punct" and before.text in _ATTACHABLE_PUNCT):
            fine = False
        if not fine:
            raise _Malformed
    return tuple(reversed(operands)), tuple(reversed(ops))


def _read_right(tokens: List[_Token], eq_index: int) -> Tuple[bool, str]:
    """The single integer just after the ``=`` at ``eq_index``."""
    k = eq_index + 1
    negative = False
    if k < len(tokens) and _is_minus(tokens[k]) and k + 1 < len(tokens) and _attached(tokens[k], tokens[k + 1]):
        negative = True
        k += 1
    if k >= len(tokens) or tokens[k].kind != "int":
        raise _Malformed
    number = tokens[k]
    if k + 1 < len(tokens):
        after = tokens[k + 1]
        # Only prose may follow: a sentence mark, or a word after a space ("= 19 apples").
        if after.kind in ("int", "dec", "op", "eq", "other"):
            raise _Malformed
        if after.kind == "word" and _attached(number, after):
            raise _Malformed
    return negative, number.text


def _value(signed: Tuple[bool, str]) -> int:
    negative, digits = signed
    return -int(digits) if negative else int(digits)


def _too_big(equation: _Equation) -> bool:
    return any(len(digits) > MAX_DIGITS for _, digits in equation.operands + (equation.result,))


def check_steps(text: str, answer: str) -> StepCheck:
    """Check a chain_sum-style path's equations against each other and the gold ``answer``.

    answer: the gold, an integer written in digits with an optional leading minus ("16", "-4");
        anything else raises ValueError (a data bug, not a model's mistake).
    """
    gold = answer.strip()
    if not _GOLD.fullmatch(gold):
        raise ValueError(f"a step-checked gold must be an integer of at most {MAX_DIGITS} digits, got {answer!r}")
    if len(text) > MAX_TEXT_CHARS:
        return StepCheck(False, 0, "too_long")
    tokens = _tokens(text)
    count = sum(token.kind == "eq" for token in tokens)
    previous: Optional[int] = None
    for index, token in enumerate(tokens):
        if token.kind != "eq":
            continue
        try:
            operands, ops = _read_left(tokens, index)
            equation = _Equation(operands, ops, _read_right(tokens, index))
        except _Malformed:
            return StepCheck(False, count, "malformed_step")
        if _too_big(equation):
            return StepCheck(False, count, "number_too_long")
        total = _value(equation.operands[0])
        for op, operand in zip(equation.ops, equation.operands[1:]):
            total = total + _value(operand) if op == "+" else total - _value(operand)
        if total != _value(equation.result):
            return StepCheck(False, count, "wrong_step")
        if previous is not None and _value(equation.operands[0]) != previous:
            return StepCheck(False, count, "chain_broken")
        previous = total
    if previous is None:
        return StepCheck(False, 0, "no_steps")
    if previous != int(gold):
        return StepCheck(False, count, "last_step_not_answer")
    return StepCheck(True, count, "ok")


# Tasks whose paths are running totals, by name; other chain_sum variants join by name.
STEP_CHECKERS: Dict[str, Callable[[str, str], StepCheck]] = {
    "chain_sum": check_steps,
    "chain_sum_long": check_steps,
    "chain_sum_big": check_steps,
}


def step_checker(task: str) -> Optional[Callable[[str, str], StepCheck]]:
    """The step checker of ``task``, or None if its paths have no checkable steps."""
    return STEP_CHECKERS.get(task)
