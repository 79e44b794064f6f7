"""The GPU check's dry run: ``scripts/gpu_check.sh --cpu`` runs every section at toy sizes on CPU
(ZeRO-3 with gloo, Triton under the interpreter) and must pass every correctness check.

The run happens once (module fixture, 1-2 minutes on 2 cores with DeepSpeed's ops cached); the
tests read its summary.json and summary.md, and feed its figures, spoiled, back to the checks to
show that they catch a disagreement.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from selfrefine_dist.benchmarks import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("kernel_tests", "logprobs", "model", "sft", "dpo", "sampling")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    summary_path = out / "summary.json"
    assert summary_path.exists(), f"no summary (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc, out, json.loads(summary_path.read_text())


def _log_tail(out: Path) -> str:
    return (out / "sections.log").read_text()[-6000:]


def _finite_positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_dry_run_passes_every_check(dry_run):
    proc, out, summary = dry_run
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert not failed, f"{failed}\n{_log_tail(out)}"
    assert summary["ok"] and proc.returncode == 0, proc.stderr[-3000:]
    names = {c["name"] for c in summary["checks"]}
    for expected in ("kernel tests pass", "log-prob values agree across methods", "SFT fused NLL = the model's cross-entropy",
                     "DPO loss = log 2 at the reference (fused, unfused, two-sequence)",
                     "DPO gradient norms agree across layouts", "DPO per-token log-probs: packed = two sequences",
                     "SFT losses finite", "DPO losses finite", "sampling generated tokens"):
        assert expected in names


def test_every_section_reports_finite_figures(dry_run):
    _, out, summary = dry_run
    sections = summary["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name in REQUIRED:
        assert sections[name]["status"] == "ok", (name, sections[name], _log_tail(out))
        assert 0 < sections[name]["seconds"] <= sections[name]["budget_s"]

    kernel = sections["kernel_tests"]
    assert kernel["passed"] > 0 and kernel["failed"] == 0

    rows = sections["logprobs"]["rows"]
    measured = {(r["method"], r["dtype"]) for r in rows if "skipped" not in r}
    for method in ("naive", "ours", "ours_nll", "ours_dpo"):
        for dtype in ("float32", "bfloat16"):
            assert (method, dtype) in measured
    for row in rows:
        if "skipped" in row:
            assert row["method"] == "liger_dpo" and row["skipped"]  # a missing peer, said so
        else:
            assert _finite_positive(row["fwd_s"], row["fwdbwd_s"]) and math.isfinite(row["value"])

    assert sections["model"]["parameters"] > 0
    steps = summary["profile"]["steps"]
    for name in ("sft", "dpo"):
        r = sections[name]
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
        assert _finite_positive(r["tokens_per_s"], r["model_tflops_per_s"], r["mfu"], r["peak_memory_gib"])
    assert sections["dpo"]["packed"]
    assert _finite_positive(sections["sampling"]["tokens_per_s"], sections["sampling"]["generated_tokens"])

    trl = sections["trl"]
    try:
        import trl as _  # noqa: F401
    except ImportError:
        assert trl["status"] == "skipped" and "TRL" in trl["reason"]
    else:
        assert trl["status"] == "ok", (trl, _log_tail(out))
        assert _finite_positive(trl["tokens_per_s"]) and len(trl["losses"]) == steps


def test_markdown_table_written(dry_run):
    _, out, summary = dry_run
    table = (out / "summary.md").read_text()
    assert table.startswith("# GPU check: PASS")
    for name in gpu_check.SECTIONS:
        assert f"| {name} |" in table
    assert "| DPO, ZeRO-3, fused loss, packed pairs | " in table and "## Log-prob benchmark" in table


def test_checks_catch_disagreements(dry_run):
    """The run's own figures, each spoiled once: the matching check fails."""
    _, _, summary = dry_run
    profile = gpu_check.CPU_PROFILE

    def failing(results):
        return {c.name for c in gpu_check.evaluate(results, profile) if not c.ok}

    assert not failing(summary["sections"])

    spoiled = copy.deepcopy(summary["sections"])
    spoiled["dpo"]["checks"]["fused_packed_loss"] += 0.05
    assert "DPO loss = log 2 at the reference (fused, unfused, two-sequence)" in failing(spoiled)

    spoiled = copy.deepcopy(summary["sections"])
    spoiled["dpo"]["checks"]["unfused_unpacked_grad_norm"] *= 1.5
    assert "DPO gradient norms agree across layouts" in failing(spoiled)

    spoiled = copy.deepcopy(summary["sections"])
    spoiled["dpo"]["checks"]["token_logp_mean_abs_diff"] = 0.3
    assert "DPO per-token log-probs: packed = two sequences" in failing(spoiled)

    spoiled = copy.deepcopy(summary["sections"])
    spoiled["dpo"]["losses"][-1] = float("nan")
    assert "DPO losses finite" in failing(spoiled)

    spoiled = copy.deepcopy(summary["sections"])
    spoiled["sft"]["checks"]["fused_nll_sum"] *= 1.1
    assert "SFT fused NLL = the model's cross-entropy" in failing(spoiled)

    spoiled = copy.deepcopy(summary["sections"])
    ours = next(r for r in spoiled["logprobs"]["rows"] if r["method"] == "ours" and "value" in r)
    ours["value"] += ours["tokens"]  # one nat per token off
    assert "log-prob values agree across methods" in failing(spoiled)

    spoiled = copy.deepcopy(summary["sections"])
    spoiled["kernel_tests"].update(failed=1, status="failed")
    assert {"kernel tests pass", "kernel_tests finished"} <= failing(spoiled)
