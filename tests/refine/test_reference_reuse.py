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
