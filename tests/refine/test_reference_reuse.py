"""Round 1 with ``dpo.reference: sft``: the untrained policy serves the reference pass (no second model
loaded), and its log-probs equal, bit for bit, those of a frozen reference loaded from the same folder.
Each layout runs in a fresh process (reference_worker.py): a DeepSpeed rank of its own."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("reference_worker.py")


@pytest.mark.parametrize("stage,dtype", [(0, "bf16"), (3, "fp32")])
def test_untrained_policy_serves_as_its_own_reference(tiny_model_dir, tmp_path, stage, dtype):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(tiny_model_dir), str(stage), dtype, str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["round1_serves_policy"] and not result["round2_serves_policy"]
    assert len(result["round1"]) == 16  # 8 pairs: chosen and rejected
    assert result["round1"] == result["frozen"]  # equal floats, not close ones
    # after a round of steps the frozen reference is loaded again: the same log-probs as before
    assert result["round2"] == result["frozen"]
    # each round's sequences (8 pairs, 16 distinct responses): round 1 runs all of them through the
    # reference; round 2 trains the same pairs and knows every value (the frozen reference's, kept)
    assert result["round1_run"] == [16, 16] and result["round2_run"] == [0, 16]
    for got, want in zip(result["round2_metrics"], result["round1_metrics"]):
        assert (got["reference_sequences_run"], got["reference_sequences"]) == (0, 16)
        assert reference_means(got) == pytest.approx(reference_means(want), rel=1e-6)


def reference_means(metrics, beta=0.1):
    """Mean reference log-prob of the step's chosen and rejected paths, from TRL's metrics
    (rewards = beta * (policy - reference), logps = policy)."""
    return [metrics[f"logps/{side}"] - metrics[f"rewards/{side}"] / beta for side in ("chosen", "rejected")]
