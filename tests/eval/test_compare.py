"""``selfrefine compare`` on evaluation files written here by hand; every number recomputed in the test."""
import json
import math
import re

import numpy as np
import pytest

from selfrefine_dist.eval.compare import compare_evaluations, compare_main, final_label, load_evaluation
from selfrefine_dist.eval.evaluate import read_result, summarize, write_result

IN_DOMAIN, OUT_OF_DOMAIN = "gsm8k", "obqa"


def uid(i: int) -> str:
    return f"q{i:04d}"  # zero-padded: sorting the uids sorts the indices


def write_eval(directory, label, outcomes, train_tasks=None):
    """``outcomes``: task -> {question index: correct}. Writes <label>.json and <label>_samples.jsonl."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"uid": uid(i), "task": task, "correct": bool(c), "completion": "..."}
            for task, by_index in outcomes.items() for i, c in by_index.items()]
    (directory / f"{label}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"label": label, "per_task": {}, "pass_at_k": {}}
    if train_tasks is not None:
        summary["train_tasks"] = train_tasks
    (directory / f"{label}.json").write_text(json.dumps(summary))


def write_config(run_dir, tasks):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("data:\n  train:\n" + "".join(f"  - task: {t}\n" for t in tasks))


def bootstrap(d, resamples, seed):
    """The paired bootstrap written out: resample question indices with replacement, mean of each resample."""
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), size=len(d))].mean() for _ in range(resamples)])
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def mde(d):
    return (1.96 + 0.84) * math.sqrt(sum((x - sum(d) / len(d)) ** 2 for x in d) / len(d)) / math.sqrt(len(d))


def section(text, title):
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def table_row(text, scope):
    line = next(line for line in text.splitlines() if line.startswith(f"| {scope} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def numbers(cell):
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell)]


@pytest.fixture
def partial_overlap(tmp_path):
    """sft answered questions 0..199 of each task, round_1 questions 100..299: 100 shared per task."""
    rng = np.random.default_rng(7)
    before = {t: {i: rng.random() < 0.4 for i in range(0, 200)} for t in (IN_DOMAIN, OUT_OF_DOMAIN)}
    after = {IN_DOMAIN: {i: rng.random() < 0.6 for i in range(100, 300)},
             OUT_OF_DOMAIN: {i: rng.random() < 0.4 for i in range(100, 300)}}
    write_eval(tmp_path / "a" / "eval", "sft", before, [IN_DOMAIN])
    write_eval(tmp_path / "b" / "eval", "round_1", after, [IN_DOMAIN])
    return tmp_path, before, after


def test_paired_change_interval_and_mde_match_a_recomputation(partial_overlap):
    tmp_path, before, after = partial_overlap
    resamples, seed = 500, 3
    sources = [str(tmp_path / "a" / "eval" / "sft.json"), str(tmp_path / "b" / "eval" / "round_1.json")]
    text = compare_evaluations(sources, resamples=resamples, seed=seed)
    part = section(text, "round_1 vs sft")
    assert "200 shared questions; 200 only in sft, 200 only in round_1." in part
    assert f"In-domain tasks: {IN_DOMAIN} (from {tmp_path / 'b' / 'eval' / 'round_1.json'})" in part
    shared = range(100, 200)
    # With one task per pooled scope, each scope's questions are one task's, in uid order.
    for scope, task in [("in-domain", IN_DOMAIN), ("out-of-domain", OUT_OF_DOMAIN), (IN_DOMAIN, IN_DOMAIN),
                        (OUT_OF_DOMAIN, OUT_OF_DOMAIN)]:
        d = np.array([float(after[task][i]) - float(before[task][i]) for i in shared])
        mean, low, high = bootstrap(d, resamples, seed)
        cells = table_row(part, scope)
        assert int(cells[1]) == len(d) == 100
        assert float(cells[2]) == pytest.approx(100 * np.mean([before[task][i] for i in shared]), abs=0.051)
        assert float(cells[3]) == pytest.approx(100 * np.mean([after[task][i] for i in shared]), abs=0.051)
        assert numbers(cells[4]) == pytest.approx([100 * mean, 100 * low, 100 * high], abs=0.051)
        assert cells[5] == ("yes" if low > 0 or high < 0 else "no")
        assert numbers(cells[6]) == pytest.approx([100 * mde(list(d))], abs=0.051)
    assert "all tasks" not in part  # pooled over all tasks only when the split is unknown

    # the headline states the in-domain change, its interval verdict and the MDE in words
    d = np.array([float(after[IN_DOMAIN][i]) - float(before[IN_DOMAIN][i]) for i in shared])
    mean, low, high = bootstrap(d, resamples, seed)
    line = next(line for line in part.splitlines() if line.startswith("- **in-domain**"))
    assert f"(n=100); the interval {'excludes 0' if low > 0 or high < 0 else 'includes 0'}" in line
    assert f"Smallest resolvable change (MDE): {100 * mde(list(d)):.1f} points." in line


def test_all_tasks_scope_when_the_split_is_unknown(tmp_path):
    rng = np.random.default_rng(0)
    before = {t: {i: rng.random() < 0.5 for i in range(80)} for t in (IN_DOMAIN, OUT_OF_DOMAIN)}
    after = {t: {i: rng.random() < 0.5 for i in range(80)} for t in (IN_DOMAIN, OUT_OF_DOMAIN)}
    write_eval(tmp_path / "x", "before", before)  # no train_tasks, not in a run's eval/, no --train-tasks
    write_eval(tmp_path / "x", "after", after)
    text = compare_evaluations([str(tmp_path / "x" / "before.json"), str(tmp_path / "x" / "after_samples.jsonl")],
                               resamples=300)
    assert "Trained-on tasks unknown" in text and "in-domain" not in text
    # same uid in two tasks: two questions; pooled keys sorted by (uid, task)
    d = np.array([float(after[t][i]) - float(before[t][i]) for i in range(80) for t in sorted(after)])
    mean, low, high = bootstrap(d, 300, 0)
    cells = table_row(text, "all tasks")
    assert int(cells[1]) == 160 and numbers(cells[4]) == pytest.approx([100 * mean, 100 * low, 100 * high], abs=0.051)


def test_train_tasks_from_the_json_then_the_config_then_the_argument(tmp_path):
    both = {IN_DOMAIN: {0: True, 1: False}, OUT_OF_DOMAIN: {0: True}}
    write_eval(tmp_path / "run" / "eval", "sft", both, [OUT_OF_DOMAIN])
    write_eval(tmp_path / "run" / "eval", "round_1", both)
    write_config(tmp_path / "run", [IN_DOMAIN])
    write_eval(tmp_path / "loose", "round_1", both)
    json_tasks = load_evaluation(str(tmp_path / "run" / "eval" / "sft.json"), [IN_DOMAIN, OUT_OF_DOMAIN])
    assert json_tasks.train_tasks == [OUT_OF_DOMAIN]
    assert json_tasks.train_tasks_from == str(tmp_path / "run" / "eval" / "sft.json")
    config_tasks = load_evaluation(str(tmp_path / "run" / "eval" / "round_1.json"), [OUT_OF_DOMAIN])
    assert config_tasks.train_tasks == [IN_DOMAIN]
    assert config_tasks.train_tasks_from == str(tmp_path / "run" / "config.yaml")
    argument = load_evaluation(str(tmp_path / "loose" / "round_1.json"), [OUT_OF_DOMAIN])
    assert (argument.train_tasks, argument.train_tasks_from) == ([OUT_OF_DOMAIN], "--train-tasks")
    assert load_evaluation(str(tmp_path / "loose" / "round_1.json")).train_tasks is None


def test_run_directory_and_run_dir_label_resolution(tmp_path):
    run = tmp_path / "run"
    outcomes = {IN_DOMAIN: {i: i % 2 == 0 for i in range(10)}}
    write_eval(run / "eval", "sft", outcomes, [IN_DOMAIN])
    assert final_label(run) == "sft" and load_evaluation(str(run)).label == "sft"
    for r in (2, 9, 10):  # by N, not by name: round_10 follows round_9
        write_eval(run / "eval", f"round_{r}", outcomes, [IN_DOMAIN])
    write_eval(run / "eval", "base", outcomes, [IN_DOMAIN])
    assert final_label(run) == "round_10"
    e = load_evaluation(str(run))
    assert (e.label, e.samples_file, e.chosen_by) == ("round_10", run / "eval" / "round_10_samples.jsonl",
                                                      "the last round")
    (run / "final.json").write_text(json.dumps({"label": "round_2", "round": 2, "reason": "best validation"}))
    assert load_evaluation(str(run)).label == "round_2"
    named = load_evaluation(f"{run}:round_9")
    assert (named.label, named.samples_file) == ("round_9", run / "eval" / "round_9_samples.jsonl")
    assert load_evaluation(str(run / "eval" / "base_samples.jsonl")).label == "base"
    text = compare_evaluations([f"{run}:sft", str(run)], resamples=100)
    assert "## round_2 vs sft" in text and f"`{run}` (final evaluation: final.json)" in text

    # the same label from two runs: the sources name them
    write_eval(tmp_path / "other" / "eval", "sft", outcomes, [IN_DOMAIN])
    text = compare_evaluations([f"{run}:sft", f"{tmp_path / 'other'}:sft"], resamples=100)
    assert f"## {tmp_path / 'other'}:sft vs {run}:sft" in text


def test_errors_name_the_path(tmp_path, capsys):
    run = tmp_path / "run"
    write_eval(run / "eval", "sft", {IN_DOMAIN: {0: True}})
    missing = tmp_path / "nope" / "eval" / "sft.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        compare_evaluations([str(run), str(missing)])
    with pytest.raises(FileNotFoundError, match=re.escape(str(run / "eval" / "round_3_samples.jsonl"))):
        compare_evaluations([str(run), f"{run}:round_3"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty" / "eval"))):
        compare_evaluations([str(run), str(tmp_path / "empty")])
    (run / "eval" / "round_1.json").write_text("{}")  # a summary without its samples
    with pytest.raises(FileNotFoundError, match=re.escape(str(run / "eval" / "round_1_samples.jsonl"))):
        compare_evaluations([str(run / "eval" / "sft.json"), str(run / "eval" / "round_1.json")])
    (run / "eval" / "round_2_samples.jsonl").write_text('{"uid": "a", "task": "gsm8k"}\n')  # no "correct"
    with pytest.raises(ValueError, match=re.escape(f"{run / 'eval' / 'round_2_samples.jsonl'}:1")):
        compare_evaluations([f"{run}:sft", f"{run}:round_2"])
    with pytest.raises(ValueError, match="at least one more"):
        compare_evaluations([f"{run}:sft"])

    assert compare_main([f"{run}:sft", str(missing)]) == 2
    captured = capsys.readouterr()
    assert str(missing) in captured.err and captured.out == ""


def test_compare_main_prints_and_writes_the_report(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_eval(tmp_path / "e", "sft", {IN_DOMAIN: {i: rng.random() < 0.3 for i in range(50)},
                                      OUT_OF_DOMAIN: {i: rng.random() < 0.3 for i in range(50)}})
    write_eval(tmp_path / "e", "round_1", {IN_DOMAIN: {i: rng.random() < 0.7 for i in range(50)},
                                          OUT_OF_DOMAIN: {i: rng.random() < 0.3 for i in range(50)}})
    out = tmp_path / "reports" / "compare.md"
    args = [str(tmp_path / "e" / "sft.json"), str(tmp_path / "e" / "round_1.json"), "--train-tasks", IN_DOMAIN,
            "--resamples", "400", "--seed", "5", "--out", str(out)]
    assert compare_main(args) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert printed == compare_evaluations(args[:2], [IN_DOMAIN], resamples=400, seed=5)
    assert "In-domain tasks: gsm8k (from --train-tasks)" in printed and "400 resamples, seed 5" in printed


def test_write_result_stores_train_tasks_and_older_files_stay_readable(tmp_path):
    rows = [{"uid": uid(i), "task": t, "correct": i % 3 == 0} for t in (IN_DOMAIN, OUT_OF_DOMAIN) for i in range(9)]
    write_result(summarize("round_1", rows, [IN_DOMAIN], resamples=50), tmp_path, [IN_DOMAIN, IN_DOMAIN])
    assert json.loads((tmp_path / "round_1.json").read_text())["train_tasks"] == [IN_DOMAIN]
    assert read_result("round_1", tmp_path).in_domain.total == 9  # the split read back from the file
    assert load_evaluation(str(tmp_path / "round_1.json")).train_tasks == [IN_DOMAIN]

    write_result(summarize("old", rows, [IN_DOMAIN], resamples=50), tmp_path)  # as written before train_tasks
    assert "train_tasks" not in json.loads((tmp_path / "old.json").read_text())
    assert read_result("old", tmp_path, [OUT_OF_DOMAIN]).in_domain.total == 9
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "old.json"))):
        read_result("old", tmp_path)
