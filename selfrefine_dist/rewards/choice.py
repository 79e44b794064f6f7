"""Read which option of a multiple-choice question a completion picks: plain text work.

An option may be named by its letter or by its text, in the phrasings models use:
"The answer is B.", "The answer is (b).", "Answer: B) pencil", "the correct option is B",
"option B is correct", "\\boxed{B}", "The answer is pencil.". Letters are case-insensitive when
marked ("(b)", "b)", "option b") and upper case when bare, so that the article in "The answer is
a pencil" is not read as option A. Option texts match case-insensitively at word boundaries,
the longest option first, with a leading article allowed ("the bank").

Rules, in order:
1. Markers ("answer is", "answer:", "option is", "choice is", "####", "\\boxed{", "X is
   correct"): the last marker whose answer names an option decides. The answer is what follows
   the marker up to the end of the line.
2. Without a marker, the first and the last line of the completion count if they are nothing
   but an option ("B", "(B)", "B. pencil", "pencil"); if they name different options, the
   answer is ambiguous (rule 3). With markers, a later statement overrides an earlier one.
3. One answer may name several options: "A or C", "both A and C", "A, C", "A and/or C", a letter
   whose text is another option's ("B) pencil" when pencil is C), or another option letter later
   in the same sentence ("A (or maybe B)", "A, since B is wrong"). Such an answer is ambiguous and
   the caller judges it wrong, even when the gold is among them: hedging must not earn a reward.
4. No reading through a window: an answer line cut by ``CHOICE_SPAN_CHARS`` before its sentence
   ends, an answer with control, format or combining characters, odd spaces or confusables
   (``extract.has_unplain_characters``), an answer put as a question ("B?") or followed by an
   alternative that names no option ("B or not B", "B.\nOr C") names no option (the caller
   judges it a parse failure). A first or last line longer than ``CHOICE_SPAN_CHARS`` is not
   read, and if what shows of it could be an answer line, the other line does not decide alone
   (no answer). When the tail has no marker but the text before it does, the final answer is
   out of reach: no answer, rather than a line read in the tail.

    >>> read_choice_answer("Pencils write. The answer is (B) pencil.", ["pen", "pencil", "ink"])
    ChoiceAnswer(letters=frozenset({'B'}), stated='(B) pencil')
    >>> sorted(read_choice_answer("The answer is A or C.", ["pen", "pencil", "ink"]).letters)
    ['A', 'C']
    >>> read_choice_answer("The answer is a pencil.", ["pen", "pencil", "ink"]).letters
    frozenset({'B'})
    >>> read_choice_answer("I am not sure.", ["pen", "pencil", "ink"])
    ChoiceAnswer(letters=frozenset(), stated=None)
    >>> sorted(read_choice_answer("The answer is A (or maybe C).", ["pen", "pencil", "ink"]).letters)
    ['A', 'C']
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Sequence

from .extract import HEDGE_AFTER, TAIL_CHARS, has_unplain_characters, marker_before

DEFAULT_LETTERS = "ABCDE"  # the letters a gold may name when the option texts are not given
# An answer after a marker fits on a line; options are rarely longer than a sentence.
CHOICE_SPAN_CHARS = 300
# Each marker in the tail is read in turn, from the last; a tail full of markers costs no more
# than this many readings.
MAX_MARKERS_READ = 20

_MARKER = re.compile(
    r"(?i:\b(?:answer|option|choice)\b\**\s{0,20}(?:(?:is|was|would be|will be|should be)\b|=|:)\**:?)"
    r"|####"
)
_BOXED_START = re.compile(r"\\boxed\s?\{")  # the span starts at the \boxed itself
_LETTER_FIRST = re.compile(  # "option B is correct", "(B) is the right answer": the span is "B"
    r"(?:(?i:option|choice)\s+)?\(?\b[A-Z]\b\)?(?=\s+(?i:is)\s+(?i:the\s+)?(?i:correct|right|best)\b)"
)
_MARKED_LETTER = re.compile(
    r"\\boxed\{\s*\(?(?P<boxed>[A-Za-z])\)?\s*\}"
    r"|\((?P<paren>[A-Za-z])\)"
    r"|\[(?P<bracket>[A-Za-z])\]"
    r"|(?i:option|choice)(?:\s+\(?|\s*\()(?P<named>[A-Za-z])\)?(?![A-Za-z])"
    r"|(?P<punct>[A-Za-z])[).:](?=\s|$)"
)
_BARE_LETTER = re.compile(r"(?P<upper>[A-Z])(?=[\s,;!?/\"*]|$)|(?P<lower>[a-z])(?=[\s.,;!?]*$)")
_AFTER_LETTER = re.compile(r"\s*(?:[-:]\s*)?")  # "B - pencil", "B: pencil", "B pencil"
_JOINER = re.compile(r"\s*(?:,\s*(?:(?:or|and)\s+)?|/\s*|\s(?:and\s*/\s*or|or|and|&)\s+)", re.IGNORECASE)
_LEAD_WORDS = re.compile(r"(?i:either|both)\s+")
_ARTICLES = ("", "a ", "an ", "the ")
_TRAILING_JUNK = re.compile(r"[\s.,;!?*_`\"')\]]*")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# What may follow the options read at the start of a cut line for it to be options only so far.
_OPTIONS_SO_FAR = re.compile(r"(?:[\s.,;!?*_`\"')\]/&]|(?i:\b(?:or|and)\b))*")
_OR_WORD = re.compile(r"(?i:\bor\b)")
_ODD_SPACE = re.compile(r"[^\S \t\r\n]")
# Option letters named after the answer in the same sentence: "(B)", "[B]", "option b", a bare "B".
_OTHER_REFERENCE = re.compile(
    r"(?<![A-Za-z0-9])(?:\((?P<paren>[A-Za-z])\)|\[(?P<bracket>[A-Za-z])\]"
    r"|(?i:option|choice)\s*\(?(?P<named>[A-Za-z])\)?(?![A-Za-z0-9])|(?P<upper>[A-Z])(?![A-Za-z0-9]))"
)
# Literal words without which no marker can be there (see ``extract.marker_before``).
_MARKER_WORDS = ("answer", "option", "choice", "####", "\\boxed", "correct", "right", "best")


@dataclass(frozen=True)
class ChoiceAnswer:
    """What a completion picks.

    letters: the options its final answer names, as upper-case letters; empty if it names none.
    stated: the final answer's text (after the marker, or the line read); None if no final
        answer was found at all.
    """

    letters: frozenset[str]
    stated: str | None


def option_letters(choices: Sequence[str] | None) -> str:
    """The letters that name the options: "ABC" for three options, "ABCDE" when not given."""
    if choices is None:
        return DEFAULT_LETTERS
    return string.ascii_uppercase[: len(choices)]


def _normalize(text: str) -> str:
    """Lower case, single spaces, no markdown emphasis, no final full stop."""
    return " ".join(text.replace("*", " ").replace("`", " ").split()).lower().rstrip(".")


def _normalize_option(text: str) -> str:
    """An option text as answers are matched against it: normalized, without a leading article
    ("a marsh" is matched by "marsh", "a marsh" and "the marsh")."""
    text = _normalize(text)
    for article in _ARTICLES[1:]:
        if text.startswith(article) and len(text) > len(article):
            return text[len(article):]
    return text


class _OptionReader:
    """Reads option references ("B", "(b)", "option B", "pencil") off a stated answer."""

    def __init__(self, choices: Sequence[str] | None) -> None:
        self.letters = option_letters(choices)
        texts: dict[str, set[str]] = {}
        for letter, choice in zip(self.letters, choices or ()):
            if _normalize_option(choice):
                texts.setdefault(_normalize_option(choice), set()).add(letter)
        # Longest first, so that "pencil sharpener" wins over "pencil".
        self.texts = sorted(texts.items(), key=lambda item: -len(item[0]))

    def read(self, text: str) -> tuple[frozenset[str], int]:
        """(letters named at the start of ``text`` and joined by "or"/"and"/",", characters read).

        ``text`` must be normalized with single spaces (``" ".join(text.split())``).
        """
        position = 0
        lead = _LEAD_WORDS.match(text)
        if lead:
            position = lead.end()
        named, position = self._reference(text, position)
        if not named:
            return frozenset(), 0
        while True:
            joiner = _JOINER.match(text, position)
            if not joiner:
                break
            more, end = self._reference(text, joiner.end())
            if not more:
                break
            named, position = named | more, end
        return named, position

    def other_letters(self, text: str) -> frozenset[str]:
        """The option letters ``text`` names in passing ("(B)", "option b", a bare "B")."""
        named = set()
        for match in _OTHER_REFERENCE.finditer(text):
            letter = next(group for group in match.groups() if group).upper()
            if letter in self.letters:
                named.add(letter)
        return frozenset(named)

    def _reference(self, text: str, position: int) -> tuple[frozenset[str], int]:
        """One reference at ``position``: a marked letter, an option text or a bare letter."""
        marked = _MARKED_LETTER.match(text, position)
        if marked:
            letter = next(group for group in marked.groups() if group).upper()
            return self._letter_then_text(text, letter, marked.end())
        by_text = self._option_text(text, position)
        if by_text[0]:
            return by_text
        bare = _BARE_LETTER.match(text, position)
        if bare:
            return self._letter_then_text(text, bare.group(0).upper(), bare.end())
        return frozenset(), position

    def _letter_then_text(self, text: str, letter: str, end: int) -> tuple[frozenset[str], int]:
        """A letter, then perhaps an option text ("B) pencil"); both count."""
        if letter not in self.letters:
            return frozenset(), end
        texted, text_end = self._option_text(text, _AFTER_LETTER.match(text, end).end())
        if texted:
            return frozenset({letter}) | texted, text_end
        return frozenset({letter}), end

    def _option_text(self, text: str, position: int) -> tuple[frozenset[str], int]:
        """The option whose text starts at ``position`` (a leading article allowed)."""
        rest = text[position:position + CHOICE_SPAN_CHARS].lower()
        for article in _ARTICLES:
            if not rest.startswith(article):
                continue
            after_article = rest[len(article):]
            for option_text, letters in self.texts:
                size = len(option_text)
                if after_article.startswith(option_text) and (
                    len(after_article) == size or not after_article[size].isalnum()
                ):
                    return frozenset(letters), position + len(article) + size
        return frozenset(), position


def _clean_line(line: str) -> str:
    """Single spaces, no markdown emphasis or quotes around it."""
    return " ".join(line.split()).strip("*_`\"' ")


def _as_stated(span: str) -> str:
    """A span as reported: without its final full stop ("(B) pencil." -> "(B) pencil")."""
    return span.rstrip(". ") or span


@dataclass(frozen=True)
class _Span:
    """An answer stated after a marker, up to the end of its line.

    cut: the line goes on past ``CHOICE_SPAN_CHARS``, or its marker stands at the very start of
        a tail that cuts the completion (what came just before it is unknown).
    """

    text: str
    cut: bool
    at_cut_start: bool
    odd_space: bool  # the raw line had spaces that ``str.split`` swallows ("\x1c", "\u2028")
    next_line: str  # the start of the line after it ("" if none within reach)


def _marked_spans(tail: str, tail_cuts: bool) -> list[_Span]:
    """The answers stated after each marker in ``tail``, the last first."""
    starts = [match.end() for match in _MARKER.finditer(tail)]
    starts += [match.start() for match in _BOXED_START.finditer(tail)]
    starts += [match.start() for match in _LETTER_FIRST.finditer(tail)]
    spans = []
    for start in sorted(starts, reverse=True)[:MAX_MARKERS_READ]:
        window = tail[start:start + CHOICE_SPAN_CHARS]
        line, newline, _ = window.partition("\n")
        span = _clean_line(line)
        if span:
            cut = not newline and start + CHOICE_SPAN_CHARS < len(tail)
            next_line = tail[start + len(line) + 1:start + len(line) + 1 + 40] if newline else ""
            spans.append(_Span(span, cut, tail_cuts and start == 0, bool(_ODD_SPACE.search(line)), next_line))
    return spans


def _judge_span(span: _Span, named: frozenset[str], end: int, reader: _OptionReader) -> ChoiceAnswer:
    """The answer a span gives, once its first ``end`` characters were read as ``named``: the
    rest of its sentence may name other options (ambiguous), a cut may hide them (unreadable)."""
    stated = _as_stated(span.text)
    rest = span.text[end:]
    sentence_end = _SENTENCE_END.search(rest)
    if span.at_cut_start or span.odd_space or (span.cut and sentence_end is None):
        return ChoiceAnswer(frozenset(), stated)
    rest_of_sentence = rest[:sentence_end.start()] if sentence_end else rest
    if has_unplain_characters(span.text[:end] + rest_of_sentence):
        return ChoiceAnswer(frozenset(), stated)
    closing = sentence_end.group(0) if sentence_end else ""
    if "?" in span.text[:end] + rest_of_sentence + closing:  # "B?", "library (bank?)": a question
        return ChoiceAnswer(frozenset(), stated)
    named = named | reader.other_letters(rest_of_sentence)
    # One option, then an alternative that names none ("B or not B", "B, or the bank"), in the
    # same sentence or opening the next sentence or line ("B.\nOr C"): a hedge, not an answer.
    following = rest[sentence_end.end():] if sentence_end else ""
    if len(named) == 1 and (_OR_WORD.search(rest_of_sentence) or HEDGE_AFTER.match(following)
                            or (not following.strip() and HEDGE_AFTER.match(span.next_line))):
        return ChoiceAnswer(frozenset(), stated)
    return ChoiceAnswer(named, stated)


def _whole_line_answer(line: str, reader: _OptionReader) -> frozenset[str]:
    """The options a line names if the line is nothing but option references."""
    line = _clean_line(line)
    named, end = reader.read(line)
    if named and _TRAILING_JUNK.fullmatch(line, end):
        return named
    return frozenset()


def _edge_lines(completion: str, reader: _OptionReader) -> tuple[list[str], bool]:
    """The first and the last non-empty line of a completion that lie whole within
    ``CHOICE_SPAN_CHARS`` of their end of it, and whether a line cut by that window may be an
    answer line: a first line whose visible start is nothing but options so far ("B or B or ..."),
    a last line whose visible end is ("... A or C"). Such a line cannot be read, and the other
    line must not decide alone."""
    long = len(completion) > CHOICE_SPAN_CHARS
    lines, blocked = [], False
    head = completion[:CHOICE_SPAN_CHARS].split("\n")
    first = next((i for i, line in enumerate(head) if line.strip()), None)
    if first is not None and long and first == len(head) - 1:
        visible = _clean_line(head[first])
        named, end = reader.read(visible)
        blocked = bool(named) and bool(_OPTIONS_SO_FAR.fullmatch(visible, end))
    elif first is not None:
        lines.append(head[first])
    end_lines = completion[-CHOICE_SPAN_CHARS:].split("\n")
    last = next((i for i in range(len(end_lines) - 1, -1, -1) if end_lines[i].strip()), None)
    before_window = completion[-CHOICE_SPAN_CHARS - 1:-CHOICE_SPAN_CHARS]
    if last is not None and long and last == 0 and before_window != "\n":
        visible = end_lines[0]
        if not before_window.isspace():  # the window starts inside a word: drop that piece
            visible = visible.split(None, 1)[1] if len(visible.split(None, 1)) > 1 else ""
        blocked = blocked or bool(_whole_line_answer(visible, reader))
    elif last is not None:
        lines.append(end_lines[last])
    return lines, blocked


def read_choice_answer(completion: str, choices: Sequence[str] | None) -> ChoiceAnswer:
    """The options a completion's final answer names; see the module docstring for the rules."""
    reader = _OptionReader(choices)
    tail_start = max(0, len(completion) - TAIL_CHARS)
    spans = _marked_spans(completion[tail_start:], tail_start > 0)
    for span in spans:
        named, end = reader.read(span.text)
        if named:
            return _judge_span(span, named, end, reader)
    if spans:  # a final answer was stated, but it names no option
        return ChoiceAnswer(frozenset(), _as_stated(spans[0].text))
    if marker_before(completion, tail_start, _MARKER_WORDS, (_MARKER, _BOXED_START, _LETTER_FIRST)):
        return ChoiceAnswer(frozenset(), None)
    lines, blocked = _edge_lines(completion, reader)
    naming = [(line, _whole_line_answer(line, reader)) for line in lines]
    naming = [(line, named) for line, named in naming if named]
    if not naming or blocked:
        return ChoiceAnswer(frozenset(), None)
    stated = _as_stated(_clean_line(naming[-1][0]))
    if any(has_unplain_characters(line) for line, _ in naming):
        return ChoiceAnswer(frozenset(), stated)
    letters = frozenset().union(*(named for _, named in naming))
    return ChoiceAnswer(letters, stated)
