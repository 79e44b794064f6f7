"""Out-of-domain arithmetic: chain_sum_big (3-digit chains) and signed_sum (signed numbers, parentheses).

Each split is its own generator seed; every rationale is checked against an independent
recomputation of the expression (Python's own parser, walked here), not against the teacher's code.
"""
import ast
import re

import pytest

from selfrefine_dist.data.demonstrations import select_demonstrations
from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.data.tasks import TASKS, get_task, signed_sum_rationale
from selfrefine_dist.pipeline import without_training_questions

NEW_TASKS = ("chain_sum_big", "signed_sum")
SPLITS = ("train", "validation", "test")
# "Compute 1 + 2 =" (chain_sum), "What is 1 + 2?", "Solve 1 + 2.", "Compute 1 + 2.", "Evaluate: 1 + 2." (signed_sum)
_QUESTION = re.compile(r"(?:Compute|What is|Solve|Evaluate:) (?P<expression>.+?)(?: =|\?|\.)")
_STEP = re.compile(r"(-?\d+) ([+-]) (-?\d+) = (-?\d+)\.|-\((-?\d+)\) = (-?\d+)\.")


def expression_of(question: str) -> str:
    match = _QUESTION.fullmatch(question)
    assert match, question
    return match["expression"]


def expected_steps(expression: str):
    """(value, steps) of the expression, from Python's AST in evaluation order: left operand, right
    operand, then the operation; a minus sign on a number is part of the number, on a group a step."""
    steps = []

    def walk(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            if isinstance(node.operand, ast.Constant):
                return -walk(node.operand)
            inner = walk(node.operand)
            steps.append(f"-({inner}) = {-inner}.")
            return -inner
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = walk(node.left), walk(node.right)
            op, value = ("+", left + right) if isinstance(node.op, ast.Add) else ("-", left - right)
            steps.append(f"{left} {op} {right} = {value}.")
            return value
        raise AssertionError(f"unexpected node {ast.dump(node)} in {expression!r}")

    value = walk(ast.parse(expression, mode="eval").body)
    return value, steps


def test_registered_as_math_with_seeds_a_million_apart():
    for name in NEW_TASKS:
        spec = get_task(name)
        assert spec.domain == "math" and spec.answer_type == "number" and spec.offline.rationale is not None
    # every split of every generated task has its own seed range: items are seeded seed + i
    seeds = sorted(int(spec.offline.splits[split].split(":")[1]) for spec in TASKS.values()
                   if spec.offline and spec.offline.kind == "reasoning_gym" and spec.offline.generator
                   for split in spec.offline.splits)
    assert len(seeds) == 3 * len([s for s in TASKS.values() if s.offline and s.offline.generator])
    assert all(b - a >= 1_000_000 for a, b in zip(seeds, seeds[1:])), seeds


@pytest.mark.parametrize("task", NEW_TASKS)
def test_splits_have_a_thousand_distinct_questions_and_are_deterministic(task):
    splits = {split: load_examples(task, "offline", split) for split in SPLITS}
    for split, examples in splits.items():
        assert len(examples) == 1000  # the default size; `limit` asks for more
        assert len({e.uid for e in examples}) == 1000
        assert len({e.question for e in examples}) == 1000, split  # no repeats within a split
        assert load_examples(task, "offline", split, offset=100, limit=50) == examples[100:150]
    assert len(load_examples(task, "offline", "test", limit=1500)) == 1500
    # splits never share a question (counted, like chain_sum's, which repeats ~2%)
    train = {e.question for e in splits["train"]}
    overlaps = {split: sum(e.question in train for e in splits[split]) for split in ("validation", "test")}
    assert overlaps == {"validation": 0, "test": 0}
    assert not {e.question for e in splits["validation"]} & {e.question for e in splits["test"]}
    clean, dropped = without_training_questions(splits["test"], splits["train"])
    assert dropped == 0 and clean == splits["test"]


@pytest.mark.parametrize("task", NEW_TASKS)
def test_every_rationale_matches_an_independent_recomputation(task):
    examples = load_examples(task, "offline", "train") + load_examples(task, "offline", "test", limit=200)
    for ex in examples:
        value, steps = expected_steps(expression_of(ex.question))
        assert ex.answer == str(value), ex
        assert ex.rationale == " ".join(steps), ex
        for step in _STEP.finditer(ex.rationale):  # each step's arithmetic holds on its own
            if step[1] is not None:
                a, op, b, c = int(step[1]), step[2], int(step[3]), int(step[4])
                assert (a + b if op == "+" else a - b) == c, step[0]
            else:
                assert -int(step[5]) == int(step[6]), step[0]
    kept, report = select_demonstrations(examples)
    assert report.kept == len(examples) and report.dropped == {}


def test_chain_sum_big_is_chain_sum_over_three_digit_numbers():
    for ex in load_examples("chain_sum_big", "offline", "validation"):
        tokens = expression_of(ex.question).split()
        assert 3 <= len(tokens[::2]) <= 4
        assert all(100 <= int(t) <= 999 for t in tokens[::2]) and set(tokens[1::2]) <= {"+", "-"}


def test_signed_sum_has_signed_operands_and_parentheses():
    examples = load_examples("signed_sum", "offline", "test")
    expressions = [expression_of(e.question) for e in examples]
    numbers = [int(n) for x in expressions for n in re.findall(r"-?\d+", x)]
    assert all(-99 <= n <= 99 for n in numbers) and min(numbers) < 0
    assert 300 < sum("(" in x for x in expressions) < 700  # about half carry parentheses
    assert all(3 <= len(re.findall(r"-?\d+", x)) <= 4 for x in expressions)
    wordings = {e.question.split()[0] for e in examples}
    assert wordings == {"What", "Solve", "Compute", "Evaluate:"}


def test_signed_sum_rationale_by_hand():
    assert signed_sum_rationale("( -75 - -63 ) + 53 - 68") == "-75 - -63 = -12. -12 + 53 = 41. 41 - 68 = -27."
    assert signed_sum_rationale("20 - ( 3 + -5 )") == "3 + -5 = -2. 20 - -2 = 22."
    assert signed_sum_rationale("-( 7 - 9 ) + 1") == "7 - 9 = -2. -(-2) = 2. 2 + 1 = 3."
    assert signed_sum_rationale("( ( 1 + 2 ) )") == "1 + 2 = 3."
    # a plain chain is worked exactly like chain_sum's teacher
    assert signed_sum_rationale("12 + 7 - 3") == "12 + 7 = 19. 19 - 3 = 16."
    for bad in ("3", "1 * 2", "1 + 2 +", "( 1 + 2", "1 + 2 )", "1 + ( )", "1 +2", "1_0 + 2", "__import__('os')"):
        with pytest.raises(ValueError, match="not a signed sum"):
            signed_sum_rationale(bad)


def test_signed_sum_rationale_on_negated_groups_from_the_generator():
    # signed_sum itself turns negated groups off; the teacher still handles what the generator makes with them on
    import reasoning_gym

    items = reasoning_gym.create_dataset(
        "basic_arithmetic", size=300, seed=123, min_terms=3, max_terms=5, min_digits=1, max_digits=2,
        operators=("+", "-"), allow_parentheses=True, allow_negation=True,
    )
    negated = 0
    for item in items:
        expression = item["metadata"]["expression"]
        value, steps = expected_steps(expression)
        assert str(value) == item["answer"]
        assert signed_sum_rationale(expression) == " ".join(steps), expression
        negated += "-(" in expression
    assert negated > 30
