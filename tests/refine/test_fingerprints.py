"""Fingerprinted stages end to end (`selfrefine run` on a tiny Llama, real Ray, vLLM and ZeRO-3 learners):
an unchanged rerun redoes nothing, a DPO key reruns the rounds from DPO on, a sampler key reruns from
sampling, `selfrefine sweep` over a DPO key links the SFT it shares, an SFT key reruns everything
(tests run in file order: each starts from the run directory the one before left)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_loop import CONFIG, run

pytestmark = pytest.mark.slow

ONE_ROUND = ["refine.rounds=1", "refine.probe_questions=4", "refine.questions_per_round=8"]


def selfrefine(config: Path, run_dir: Path, *overrides: str) -> str:
    out = run([sys.executable, "-m", "selfrefine_dist.cli", "run", "--config", str(config), f"run.dir={run_dir}",
               *ONE_ROUND, *overrides])
    return out.stdout


def decisions(stdout: str) -> dict:
    """stage name -> "reused" | "computing" from the console lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("stage "):
            name, _, rest = line[len("stage "):].partition(": ")
            if rest.startswith(("reused", "computing")):
                out[name] = rest.split()[0].rstrip(",")
    return out


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprints")
    config = root / "loop.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    run_dir = root / "run"
    stdout = selfrefine(config, run_dir)
    return config, run_dir, stdout


def test_first_run_computes_every_stage_and_records_it(first_run):
    _, run_dir, stdout = first_run
    d = decisions(stdout)
    assert d == {name: "computing" for name in d}
    assert {"sft", "eval/sft", "round_01/samples", "round_01/pairs", "round_01/dpo", "eval/round_1"} <= set(d)
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert all(entry["status"] == "done" for entry in ledger.values())
    report = json.loads((run_dir / "rounds" / "round_01" / "sample_report.json").read_text())
    assert report["probe_questions"] == 4 and 0.0 <= report["probe_accuracy_before"] <= 1.0
    summary = json.loads((run_dir / "rounds" / "round_01" / "summary.json").read_text())
    assert 0.0 <= summary["probe_accuracy_after"] <= 1.0
    assert json.loads((run_dir / "final.json").read_text())["label"] == "round_1"


def test_unchanged_rerun_redoes_nothing(first_run):
    config, run_dir, _ = first_run
    before = (run_dir / "rounds" / "round_01" / "dpo_metrics.jsonl").stat().st_mtime_ns
    stdout = selfrefine(config, run_dir)
    assert "computing" not in stdout and "stage sft: computing" not in stdout, stdout
    assert "round 1: done earlier" in stdout
    assert (run_dir / "rounds" / "round_01" / "dpo_metrics.jsonl").stat().st_mtime_ns == before


def test_dpo_key_reruns_the_round_from_dpo_not_sft_or_sampling(first_run):
    config, run_dir, _ = first_run
    samples = (run_dir / "rounds" / "round_01" / "samples.jsonl").read_text()
    stdout = selfrefine(config, run_dir, "dpo.lr=2.0e-3")
    d = decisions(stdout)
    assert d["sft"] == "reused" and d["eval/sft"] == "reused" and "sft: on 2 Ray learners" not in stdout
    assert d["round_01/samples"] == "reused" and d["round_01/pairs"] == "reused"
    assert d["round_01/dpo"] == "computing" and d["eval/round_1"] == "computing"
    assert "dpo.lr: 0.001 -> 0.002" in stdout  # the console says which key made it stale
    assert (run_dir / "rounds" / "round_01" / "samples.jsonl").read_text() == samples
    assert list((run_dir / "stale").rglob("dpo_metrics.jsonl"))  # the old round kept aside, not deleted


def test_sampler_key_reruns_from_sampling(first_run):
    config, run_dir, _ = first_run
    stdout = selfrefine(config, run_dir, "dpo.lr=2.0e-3", "sampler.temperature=0.7")
    d = decisions(stdout)
    assert d["sft"] == "reused" and d["eval/sft"] == "reused"
    assert d["round_01/samples"] == "computing" and d["round_01/dpo"] == "computing"
    assert "sampler.temperature: 1.0 -> 0.7" in stdout
    rows = [json.loads(line) for line in (run_dir / "rounds" / "round_01" / "samples.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "rounds" / "round_01" / "sample_report.json").read_text())
    assert report["sampling_temperature"] == 0.7 and len(rows) == 8 * 3


def test_sweep_over_a_dpo_key_shares_one_sft(first_run):
    config, run_dir, _ = first_run
    root = run_dir.parent  # the first run is a sibling of the variants: its SFT is linked, not retrained
    cmd = [sys.executable, "-m", "selfrefine_dist.cli", "sweep", "--config", str(config), *ONE_ROUND,
           "--grid", "dpo.lr=[1.0e-3,2.0e-3]", "--dir", str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    assert "sft: on 2 Ray learners" not in out.stdout  # no variant trained an SFT of its own
    names = ["lr=0.001", "lr=0.002"]
    for name in names:
        assert (root / name / "sft").is_symlink() and (root / name / "sft").resolve() == (run_dir / "sft").resolve()
    second = decisions(out.stdout.split("variant 2/2")[1])
    assert second["round_01/samples"] == "reused" and second["round_01/dpo"] == "computing"  # same policy, same keys
    table = (root / "sweep.md").read_text()
    assert all(f"| {n} |" in table for n in names) and "in-domain change [95% CI]" in table
    assert (root / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_key_reruns_everything(first_run):
    config, run_dir, _ = first_run
    stdout = selfrefine(config, run_dir, "dpo.lr=2.0e-3", "sampler.temperature=0.7", "sft.lr=1.0e-3",
                        "refine.rounds=0")
    d = decisions(stdout)
    assert d["sft"] == "computing" and d["eval/sft"] == "computing" and "sft: on 2 Ray learners" in stdout
    assert "sft.lr: 0.002 -> 0.001" in stdout
