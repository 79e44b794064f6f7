"""Rewards: extract a completion's final answer and check it against the gold answer.

    >>> from selfrefine_dist.rewards import check_answer
    >>> check_answer("... 9 * 2 = 18. The answer is 18.", "18", "number").score
    1.0

See ``check.py`` for the verdicts, ``extract.py`` and ``choice.py`` for how answers are found,
``math_process.py`` for the timeout, and ``steps.py`` for checking the running totals of
chain_sum-style paths step by step.
"""
from .check import ANSWER_TYPES, REASONS, RewardResult, check_answer, extract_gsm8k_gold
from .steps import STEP_CHECKERS, StepCheck, check_steps, step_checker

__all__ = ["ANSWER_TYPES", "REASONS", "RewardResult", "check_answer", "extract_gsm8k_gold",
           "STEP_CHECKERS", "StepCheck", "check_steps", "step_checker"]
