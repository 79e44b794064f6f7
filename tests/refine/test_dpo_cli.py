"""`selfrefine dpo` on a pairs file under torchrun (two gloo ranks): the loop's learner outside Ray."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from selfrefine_dist.data.sft_dataset import render_prompt
from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.data.tasks import get_task
from selfrefine_dist.models.loading import load_tokenizer
from selfrefine_dist.refine.records import PreferencePair

pytestmark = pytest.mark.slow


def test_dpo_on_a_pairs_file(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "sft" / "model")
    tok = load_tokenizer(str(tiny_model_dir))
    pairs = [PreferencePair(q.uid, q.task, render_prompt(tok, get_task(q.task).user_prompt(q)), f"The answer is {q.answer}.",
                            "The answer is 0.", "cot_correct", "cot_incorrect")
             for q in load_examples("gsm8k", "offline", "test", limit=8)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p.as_dict()) + "\n" for p in pairs))
    cmd = [sys.executable, "-m", "selfrefine_dist.cli", "dpo", f"run.dir={tmp_path / 'run'}", "model.dtype=fp32",
           f"dpo.pairs_file={pairs_file}", "dpo.lr=1e-3", "dpo.micro_batch_size=2", "dpo.epochs=2",
           "distributed.nproc_per_node=2", "data.max_len=1024"]
    out = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["stage"] == "dpo"]
    assert len(steps) == 4  # 8 pairs / (2 ranks x 2 pairs) x 2 epochs
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and steps[-1]["loss"] < steps[0]["loss"]
    assert (tmp_path / "run" / "dpo" / "model" / "config.json").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"uid": "u", "prompt": "p"}\n')
    out = subprocess.run(cmd[:-6] + [f"dpo.pairs_file={bad}", "distributed.nproc_per_node=1"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and f"{bad}: row 1: not a preference pair" in out.stderr


def test_the_dpo_command_imports_no_ray():
    """`selfrefine dpo` runs the learner outside Ray: its modules and settings leave Ray unimported (~30 MiB of
    a learner's resident memory, which the DPO benchmark counts)."""
    code = ("import sys; from selfrefine_dist.config import load_config; "
            "from selfrefine_dist.refine.offline_dpo import run_dpo; from selfrefine_dist.refine.learner import "
            "Learner, learner_spec; spec = learner_spec(load_config('configs/demo_cpu.yaml'), '/m', 1); "
            "print(spec.lean_activations, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "False"]
