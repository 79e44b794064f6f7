"""The run report, built on CPU from a run directory written here the way a run writes it."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from selfrefine_dist.config import load_config, to_yaml
from selfrefine_dist.eval.evaluate import summarize, write_result
from selfrefine_dist.report import write_report
from selfrefine_dist.tracking import MetricsLogger

IN_DOMAIN, OUT_OF_DOMAIN = "gsm8k", "obqa"  # the default config trains on gsm8k
N = 120  # questions per task


def rows(in_domain_correct: int, out_of_domain_correct: int):
    """Per-question outcomes: the first ``*_correct`` questions of each task answered right."""
    return [{"uid": f"{task}-{i}", "task": task, "gold": "1", "extracted": "1" if i < k else "2", "correct": i < k,
             "reason": "correct" if i < k else "wrong", "completion": "The answer is 1."}
            for task, k in [(IN_DOMAIN, in_domain_correct), (OUT_OF_DOMAIN, out_of_domain_correct)] for i in range(N)]


def write_eval(run_dir, label, in_domain_correct, out_of_domain_correct):
    write_result(summarize(label, rows(in_domain_correct, out_of_domain_correct), [IN_DOMAIN], resamples=200),
                 run_dir / "eval")


def write_round(run_dir, r, steps=5):
    out = run_dir / "rounds" / f"round_{r:02d}"
    out.mkdir(parents=True)
    history = [{"loss": 0.69 - 0.05 * s, "rewards/chosen": 0.02 * s, "rewards/rejected": -0.03 * s,
                "rewards/margins": 0.05 * s, "rewards/accuracies": 0.5 + 0.08 * s, "logps/chosen": -40.0,
                "logps/rejected": -45.0 - s, "lr": 1e-6, "grad_norm": 3.0, "tokens_per_s": 900.0, "round": r,
                "step_s": 2.0, "reference_s": 4.0} for s in range(steps)]
    (out / "dpo_metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {"round": r, "sample_accuracy": 0.4 + 0.1 * r, "pass_at_4": 0.6 + 0.1 * r, "questions": 32,
               "paths": 128, "pair_questions": 32, "pairs_kept": 40, "pairs_capped": 12, "duplicate_paths": 3,
               "dropped_all_correct": 5 * r, "dropped_all_incorrect": 8 - 2 * r, "dropped_pairs_too_long": 2,
               "pairs_unused": 6, "dpo_steps": steps, "dpo_loss": history[-1]["loss"], "dpo_step_s": 2.0,
               "dpo_reference_s": 4.0, "dpo_tokens_per_s": 900.0, "sample_s": 30.0, "pair_s": 0.5, "dpo_s": 20.0,
               "reference_logps_s": 4.0, "export_s": 3.0, "sync_s": 1.5, "eval_s": 12.0,
               "sampler_peak_rss_gib": 1.5 + r, "dpo_reference_peak_rss_gib": 2.25, "dpo_peak_rss_gib": 3.0 + r}
    (out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def full_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config()))
    logger = MetricsLogger(run_dir)
    for step in range(1, 11):
        logger.log({"loss": 2.0 / step, "lr": 1e-5, "peak_rss_gib": 4.0 + step / 10}, step=step, stage="sft")
    write_eval(run_dir, "base", 20, 40)
    write_eval(run_dir, "sft", 40, 60)
    write_round(run_dir, 1)
    write_eval(run_dir, "round_1", 60, 60)
    write_round(run_dir, 2)
    write_eval(run_dir, "round_2", 90, 60)  # a big in-domain gain; out-of-domain answers identical to sft
    logger.log({"teach_s": 5.0, "sft_s": 80.0, "sampler_start_s": 15.0, "eval_base_s": 12.0, "eval_sft_s": 11.0,
                "rounds_s": 140.0}, stage="timing")
    return run_dir


def assert_valid_pngs(run_dir, text):
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    pngs = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "report").glob("*.png"))
    assert sorted(links) == pngs  # every plot linked, every link a plot
    for link in links:
        path = run_dir / link
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
    return links


def section(text, title):
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_full_run_report(full_run):
    path = write_report(full_run)
    text = path.read_text()
    assert path == full_run / "report.md"
    links = assert_valid_pngs(full_run, text)
    assert set(links) == {f"report/{n}.png" for n in ("accuracy", "rounds", "dpo", "displacement", "timing",
                                                        "sft_loss")}
    assert "Could not build" not in text and "not found" not in text

    # the accuracy table: one row per stage, in stage order, numbers as in the eval JSON
    table = [line for line in section(text, "Accuracy").splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["stage", "in-domain", "out-of-domain", IN_DOMAIN, OUT_OF_DOMAIN]
    keys = {"in-domain": ("in_domain",), "out-of-domain": ("out_of_domain",),
            IN_DOMAIN: ("per_task", IN_DOMAIN), OUT_OF_DOMAIN: ("per_task", OUT_OF_DOMAIN)}
    stages = []
    for line in table[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        stages.append(cells["stage"])
        result = json.loads((full_run / "eval" / f"{cells['stage']}.json").read_text())
        for column, path_keys in keys.items():
            acc = result
            for k in path_keys:
                acc = acc[k]
            numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", cells[column])]
            expected = [100 * acc["accuracy"], 100 * acc["ci_low"], 100 * acc["ci_high"]]
            assert numbers == pytest.approx(expected, abs=0.051)  # printed to one decimal
            assert f"(n={acc['total']})" in cells[column]
    assert stages == ["base", "sft", "round_1", "round_2"]

    # the sft -> last round change: in-domain +41.7 points, interval excludes 0; out-of-domain exactly 0
    change = section(text, "Change from sft to round_2")
    assert re.search(r"\*\*in-domain\*\*: \+41\.7 \[\+\d+\.\d, \+\d+\.\d\] points \(n=120\); the interval excludes 0",
                     change)
    assert "**out-of-domain**: +0.0 [+0.0, +0.0] points (n=120); the interval includes 0" in change
    # the smallest resolvable change: in-domain 50 of 120 questions went wrong -> right, d = 1 on them, else 0
    d = np.array([1.0] * 50 + [0.0] * 70)
    mde = (1.96 + 0.84) * np.sqrt(np.mean((d - d.mean()) ** 2)) / np.sqrt(len(d))
    assert f"Smallest resolvable change (MDE): {100 * mde:.1f} points." in change.split("**in-domain**")[1]
    assert "(MDE): not estimable, no question changed outcome." in change.split("**out-of-domain**")[1]
    assert "| in-domain | 120 | +41.7 [" in change and f"| yes | {100 * mde:.1f} |" in change
    assert "round_2 is the last round." in change

    assert "| 2 | 0.600 | 0.800 | 40 |" in section(text, "Rounds")
    assert "| 2 | 5 | 0.000 -> 0.200 |" in section(text, "DPO")
    timing = section(text, "Time per stage")
    assert "| sft | 80.0 |" in timing and "dpo (excl. reference)" in timing
    assert "| 1 | 30.0 | 0.5 | 4.0 | 16.0 | 3.0 | 1.5 | 12.0 | 67.0 |" in timing  # dpo 20 s less 4 s of reference
    assert "10 logged steps; loss 2.000 at step 1 -> 0.200 at step 10" in section(text, "SFT")
    memory = section(text, "Memory")  # the largest SFT step's peak, then each round's stages
    assert "| SFT (learner) | 5.000 |" in memory and "| round 2: sampling (sampler) | 3.500 |" in memory
    assert "| round 1: reference pass (learner) | 2.250 |" in memory and "| round 2: DPO steps (learner) | 5.000 |" in memory


def history(chosen, rejected):
    """DPO step records with TRL's rewards (beta times the policy-minus-reference log-probs)."""
    return [{"loss": 0.6, "rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
             "rewards/accuracies": 0.7, "tokens_per_s": 900.0, "reference_s": 1.0} for c, r in zip(chosen, rejected)]


def test_why_each_round_helped_or_hurt(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    beta = 0.2
    (run_dir / "config.yaml").write_text(to_yaml(load_config(overrides=[f"dpo.beta={beta}"])))
    steps = {1: ([0.0, 0.04, 0.10, 0.16], [0.0, -0.08, -0.2, -0.3]),  # chosen up, rejected down
             2: ([0.1, 0.0, -0.06, -0.12, -0.2], [0.1, -0.1, -0.3, -0.5, -0.7])}  # both fall below 0
    # round 1 was written before the new keys existed: only what older runs have
    summaries = {1: {"round": 1, "sample_accuracy": 0.5, "pass_at_4": 0.75, "pairs_kept": 30},
                 2: {"round": 2, "sample_accuracy": 0.55, "pass_at_4": 0.8, "pairs_kept": 24, "no_answer_rate": 0.1,
                     "mean_path_tokens": 181.4, "lucky_share": 0.05, "probe_accuracy_before": 0.5,
                     "probe_accuracy_after": 0.625, "probe_questions": 32, "validation_accuracy": 0.45}}
    for r, (chosen, rejected) in steps.items():
        out = run_dir / "rounds" / f"round_{r:02d}"
        out.mkdir(parents=True)
        (out / "dpo_metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history(chosen, rejected)))
        (out / "summary.json").write_text(json.dumps(summaries[r]))
    text = write_report(run_dir).read_text()
    why = section(text, "Why each round helped or hurt")
    assert "Could not build" not in text and "report/displacement.png" in why
    assert_valid_pngs(run_dir, text)
    assert f"beta = {beta}" in why

    # the last step's log-prob change vs the reference: rewards / beta
    assert f"| 1 | 4 | {0.16 / beta:+.2f} | {-0.3 / beta:+.2f} | no |" in why
    assert f"| 2 | 5 | {-0.2 / beta:+.2f} | {-0.7 / beta:+.2f} | yes |" in why

    # every summary key, "-" where an older round lacks it; fractions as percentages
    rows = [line for line in why.splitlines() if line.startswith("| round | sample_accuracy")]
    assert rows[0] == ("| round | sample_accuracy | pass_at_4 | no_answer_rate | mean_path_tokens | lucky_share | "
                       "probe_accuracy_before | probe_accuracy_after | probe_questions | validation_accuracy | "
                       "pairs_kept |")
    assert "| 1 | 50.0% | 75.0% | - | - | - | - | - | - | - | 30 |" in why
    assert "| 2 | 55.0% | 80.0% | 10.0% | 181 | 5.0% | 50.0% | 62.5% | 32 | 45.0% | 24 |" in why

    verdicts = {int(m[1]): m[2] for m in re.finditer(r"^- \*\*round (\d+)\*\*: (.*)$", why, re.M)}
    assert verdicts[1] == (f"chosen up, rejected down (chosen {0.16 / beta:+.2f}, rejected {-0.3 / beta:+.2f} "
                           "vs the reference).")
    assert verdicts[2].startswith("learned its own questions (+12.5 points on 32) but likelihood displacement: "
                                  "chosen and rejected both fell")


def test_verdicts_compare_with_the_previous_round(tmp_path):
    base = {"no_answer_rate": 0.1, "lucky_share": 0.2, "mean_path_tokens": 100.0, "validation_accuracy": 0.5,
            "probe_accuracy_before": 0.5, "probe_accuracy_after": 0.5, "probe_questions": 16}
    later = {"no_answer_rate": 0.25, "lucky_share": 0.1, "mean_path_tokens": 130.0, "validation_accuracy": 0.4,
             "probe_accuracy_before": 0.5, "probe_accuracy_after": 0.4375, "probe_questions": 16}
    for r, summary in [(1, base), (2, later)]:
        out = tmp_path / "rounds" / f"round_{r:02d}"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"round": r, **summary}))
    (tmp_path / "validation").mkdir()  # sft on the validation questions: 2 of 5 right
    (tmp_path / "validation" / "sft_samples.jsonl").write_text(
        "".join(json.dumps({"uid": str(i), "task": IN_DOMAIN, "correct": i < 2}) + "\n" for i in range(5)))
    why = section(write_report(tmp_path).read_text(), "Why each round helped or hurt")
    assert "- **round 1**: validation +10.0 points vs sft; no change on its own questions (50.0% on 16)." in why
    assert ("- **round 2**: fewer lucky answers (20.0% -> 10.0%) but lost ground on its own questions (-6.2 points "
            "on 16); validation -10.0 points vs round 1; more no-answers (10.0% -> 25.0%); longer paths "
            "(100 -> 130 tokens).") in why
    assert "displacement" not in why  # no DPO step records: no plot, no claim


def test_displacement_without_a_config(tmp_path):
    """No config.yaml, so no beta: TRL's rewards as they are, said so; a step without a reward key is no error."""
    out = tmp_path / "rounds" / "round_01"
    out.mkdir(parents=True)
    steps = history([0.0, -0.1, -0.2], [0.0, -0.2, -0.4]) + [{"loss": 0.5}]
    (out / "dpo_metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in steps))
    text = write_report(tmp_path).read_text()
    why = section(text, "Why each round helped or hurt")
    assert "Could not build" not in text and "beta unknown" in why
    assert "| 1 | 4 | - | - | yes |" in why  # both fell over the steps that have them
    assert "- **round 1**: no before/after numbers recorded." in why  # the last step has no rewards to state


def test_change_to_the_round_chosen_on_validation(full_run):
    (full_run / "final.json").write_text(json.dumps({"label": "round_1", "round": 1, "reason": "best validation"}))
    text = write_report(full_run).read_text()
    change = section(text, "Change from sft to round_1")
    assert "round_1 is the final model (final.json: round_1 (round 1), reason: best validation)." in change
    # sft 40/120 -> round_1 60/120 in-domain
    assert re.search(r"\*\*in-domain\*\*: \+16\.7 \[", change)
    assert "## Change from sft to round_2" not in text

    (full_run / "final.json").write_text(json.dumps({"label": "sft", "round": 0, "reason": "no round beat sft"}))
    change = section(write_report(full_run).read_text(), "Change from sft to round_2")
    assert "The final model is sft itself (final.json: sft (round 0), reason: no round beat sft)" in change
    assert "+41.7" in change


def test_rewriting_drops_plots_whose_source_is_gone(full_run):
    write_report(full_run)
    (full_run / "metrics.jsonl").unlink()
    text = write_report(full_run).read_text()
    assert not (full_run / "report" / "sft_loss.png").exists()
    assert "No SFT loss records" in text
    assert_valid_pngs(full_run, text)


def test_only_sft_eval_and_no_rounds(tmp_path):
    write_eval(tmp_path, "sft", 50, 70)
    text = write_report(tmp_path).read_text()
    assert assert_valid_pngs(tmp_path, text) == ["report/accuracy.png"]
    assert "| sft | 41.7 [" in text
    for line in ["Needs the sft evaluation and at least one round's", "No finished rounds", "No DPO step metrics",
                 "No timing record in metrics.jsonl and no round summaries", "No SFT loss records"]:
        assert line in text
    assert "Could not build" not in text


def test_empty_run_dir_and_malformed_files(tmp_path):
    assert "No evaluation results" in write_report(tmp_path).read_text()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "sft.json").write_text('{"label": "sft", "per_')  # cut short
    (tmp_path / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 1.0}\n{"stage": "sf')
    text = write_report(tmp_path).read_text()
    assert "No evaluation results" in text and "1 logged steps" in text
    assert_valid_pngs(tmp_path, text)


@pytest.mark.filterwarnings("error")
def test_round_summary_with_few_keys(tmp_path):
    out = tmp_path / "rounds" / "round_01"
    out.mkdir(parents=True)
    summary = {"round": 1, "sample_accuracy": 0.5, "pairs_kept": 8, "sample_s": 3.0}
    (out / "summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path).read_text()
    assert "Could not build" not in text and "| 1 | 0.500 | 8 |" in text
    assert assert_valid_pngs(tmp_path, text) == ["report/rounds.png", "report/timing.png"]
    why = section(text, "Why each round helped or hurt")
    assert "| 1 | 50.0% | - | - | - | - | - | - | - | 8 |" in why
    assert "- **round 1**: no before/after numbers recorded." in why
