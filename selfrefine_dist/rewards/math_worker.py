"""math-verify, run in a helper process so that a pathological answer can be cut off.

math-verify turns answer text into sympy objects and compares them. Some inputs make that
take minutes or forever (``9^9^9`` or ``10^{10^{10^{10}}}`` compared with a number sit in C code
that no signal interrupts; 200 nested ``\\frac`` take seconds to parse). math-verify's own timeout
uses SIGALRM, which only works in a process's main thread, and ours is also called from worker
threads (Ray actors, thread pools). So the parsing and the comparison run here, in a process of
their own that ``math_process.MathVerifyProcess`` kills when it overruns.

This file runs as a script (``python math_worker.py``) and imports nothing from the package, only
the standard library and math-verify. Protocol, one JSON object per line:

    in:  {"answer_text": "18 apples", "gold": "18", "deadline_s": 2.0}
    out: {"gold_parsed": true, "answer_parsed": true, "equal": true}
      or {"timed_out": true}

``compare`` is an ordinary function too, for tests:

    >>> compare("1,234 apples", "1234")["equal"]
    True
    >>> compare("\\\\frac{1}{2}", "0.5")["equal"]
    True
    >>> compare("18.5", "18")
    {'gold_parsed': True, 'answer_parsed': True, 'equal': False}
    >>> compare("twenty", "20")
    {'gold_parsed': True, 'answer_parsed': False, 'equal': False}

Safety: math-verify hands sympy's ``parse_expr`` only what its regular expressions let through
(digits, decimal points, spaces, ``+-*/^()×÷``), and LaTeX goes through an ANTLR grammar; no model
text is evaluated as Python.
"""
from __future__ import annotations

import json
import logging
import signal
import sys

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# The helper needs about 60 MB; an answer that wants more than this is pathological.
MEMORY_LIMIT_BYTES = 2 * 1024**3
# LaTeX first ("\frac{1}{2}", "\boxed{18}"), then plain numbers and expressions ("1,234", "3/4").
_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


def _first_value(extracted: list) -> object | None:
    """The sympy value in math-verify's parse result; the strings there are only fallbacks."""
    return next((item for item in extracted if not isinstance(item, str)), None)


def parse_value(text: str) -> object | None:
    """The sympy value of a stated answer or a gold, or None if math-verify finds none.

    The text is handed over as "Answer: <text>", so that math-verify's answer-anchored patterns
    pick "16" out of "18 - 2 = 16" and "18" out of "18 apples". LaTeX written without ``$``
    delimiters ("\\sqrt{2}") that yields no value is tried once more inside ``$...$``.
    math-verify's own timeouts are off (None): in this process the caller's deadline rules.
    """
    value = _first_value(parse(f"Answer: {text}", _EXTRACTION_CONFIG, parsing_timeout=None))
    if value is None and "\\" in text and "$" not in text:
        value = _first_value(parse(f"Answer: ${text}$", _EXTRACTION_CONFIG, parsing_timeout=None))
    return value


def _latex_reading(text: str) -> object | None:
    """The value of ``text`` read as LaTeX (inside ``$...$``), for text with LaTeX structure
    written without delimiters; None for other text."""
    if "$" in text or text.startswith("\\boxed") or not any(c in text for c in "\\^{}"):
        return None
    return _first_value(parse(f"Answer: ${text}$", _EXTRACTION_CONFIG, parsing_timeout=None))


def compare(answer_text: str, gold: str) -> dict:
    """Parse the gold and the answer with math-verify and compare their values.

    Only the sympy values are compared, never math-verify's fallback strings: an answer that
    cannot be turned into a value does not equal the gold by spelling alone. LaTeX written
    without delimiters is read both ways, as text and as LaTeX, and equals the gold only if
    every reading does: math-verify reads "2^{10}" as text as 2 and as LaTeX as 1024, and
    "\\frac{1}{\\frac{1}{2}}" as text as 1/2; such an answer is no plain statement of 2 or 1/2.

        >>> compare("2^{10}", "2")["equal"], compare("2^{10}", "1024")["equal"]
        (False, False)
    """
    gold_value = parse_value(gold)
    answer_value = parse_value(answer_text)
    equal = (
        gold_value is not None
        and answer_value is not None
        and verify(gold_value, answer_value, timeout_seconds=None)
    )
    if equal:
        as_latex = _latex_reading(answer_text)
        equal = as_latex is None or verify(gold_value, as_latex, timeout_seconds=None)
    return {
        "gold_parsed": gold_value is not None,
        "answer_parsed": answer_value is not None,
        "equal": bool(equal),
    }


class _DeadlinePassed(BaseException):
    """Raised by SIGALRM inside a request; a BaseException so that the ``except Exception``
    blocks in math-verify and sympy do not swallow it."""


def _on_alarm(signum, frame):
    raise _DeadlinePassed()


def serve(requests, replies) -> None:
    """Answer requests, one JSON line each, until the input closes (the parent is gone).

    Each request gets a SIGALRM timer of its own deadline: Python-level slowness ends here with
    {"timed_out": true} and the process lives on; work stuck in C code outlives the timer and the
    parent kills the process.
    """
    signal.signal(signal.SIGALRM, _on_alarm)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        try:
            signal.setitimer(signal.ITIMER_REAL, float(request["deadline_s"]))
            reply = compare(request["answer_text"], request["gold"])
        except _DeadlinePassed:
            reply = {"timed_out": True}
        except Exception as error:  # a bug in math-verify on odd input: report, keep serving
            reply = {"error": f"{type(error).__name__}: {error}"[:500]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _cap_memory(limit_bytes: int) -> None:
    """Make a memory-hungry answer ("10^(10^9)") fail with MemoryError, which math-verify catches,
    instead of swelling this process until the machine's OOM killer steps in."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    except (ImportError, ValueError, OSError):  # not POSIX, or a lower hard limit: leave it
        pass


def main() -> None:
    _cap_memory(MEMORY_LIMIT_BYTES)
    replies = sys.stdout
    sys.stdout = sys.stderr  # only replies may reach the reply pipe
    # math-verify warns once that its own timeout is off; here the parent's deadline rules.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
