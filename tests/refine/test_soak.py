"""Soak: five short self-refine rounds (`selfrefine run`, tiny Llama) while sampler actors are SIGKILLed
at seeded random points, from outside, as the OOM killer would.

Each round one sampler is killed while it generates that round's samples (the kill lands inside a work
item), and one more at a seeded random moment after it (during DPO, the weight sync, the next sampling or
the final evaluation). Ray restarts the actor; the pool brings it to the current weights and retries its
work item. The run must finish with every question sampled exactly once per round (K paths each, none
lost, none duplicated) and every artifact consistent with the samples it was built from.

HF sampler backend: a restarted vLLM engine takes 15-40 s here, ten of them would not fit the few minutes
this test may take; the pool's recovery is the same for both backends (tests/sampling/ kill a vLLM actor).
"""
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from test_loop import CONFIG

pytestmark = pytest.mark.slow

ROUNDS, QUESTIONS_PER_ROUND, K = 5, 4, 3
SEED = 1234


def descendants(root: int):
    """(pid, command line) of every process below ``root``."""
    parent, cmdline = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            cmdline[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parent.items() if pp == pid]
        out += [(c, cmdline[c]) for c in children]
        frontier += children
    return out


def samplers(root: int, calls=None):
    """Sampler actor processes below ``root`` that have finished starting, optionally only inside ``calls``."""
    out = []
    for pid, title in descendants(root):
        if title.startswith("ray::SamplerActor") and not title.endswith("__init__"):
            if calls is None or title.split(".")[-1] in calls:
                out.append((pid, title))
    return out


def ledger_status(run_dir: Path, stage: str):
    try:
        return json.loads((run_dir / "stages.json").read_text()).get(stage, {}).get("status")
    except (OSError, ValueError):  # being replaced
        return None


class Killer(threading.Thread):
    """Per round: kill a sampler inside ``generate`` once the round's sampling has started, then another at
    a seeded random moment 0-8 s later (whatever it is doing then)."""

    def __init__(self, driver: subprocess.Popen, run_dir: Path, seed: int):
        super().__init__(daemon=True)
        self.driver, self.run_dir, self.rng = driver, run_dir, random.Random(seed)
        self.kills = []  # (round, what it was doing, pid)

    def alive(self):
        return self.driver.poll() is None

    def kill(self, r, pid, title):
        try:
            os.kill(pid, 9)
            self.kills.append((r, title.split(".", 1)[-1] if "." in title else "idle", pid))
        except ProcessLookupError:
            pass

    def run(self):
        for r in range(1, ROUNDS + 1):
            while self.alive() and ledger_status(self.run_dir, f"round_{r:02d}/samples") is None:
                time.sleep(0.02)
            deadline = time.time() + 60
            while self.alive() and time.time() < deadline:
                busy = samplers(self.driver.pid, calls={"generate"})
                if busy:
                    self.kill(r, *self.rng.choice(busy))
                    break
                time.sleep(0.02)
            time.sleep(self.rng.uniform(0.0, 8.0))
            ready = samplers(self.driver.pid) if self.alive() else []
            if ready:
                self.kill(r, *self.rng.choice(ready))


def test_five_rounds_with_sampler_actors_killed_keep_every_artifact_consistent(tiny_model_dir, tmp_path):
    from selfrefine_dist.config import load_config
    from selfrefine_dist.data.sources import load_slices
    from selfrefine_dist.data.tasks import get_task

    config = tmp_path / "soak.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", f"refine.rounds={ROUNDS}", f"refine.questions_per_round={QUESTIONS_PER_ROUND}",
                 f"sampler.samples_per_question={K}", "sampler.backend=hf", "sampler.num_actors=2",
                 "sampler.chunk_size=1", "sampler.max_restarts=100", "refine.eval_every_round=false",
                 "refine.probe_questions=0"]
    cmd = [sys.executable, "-m", "selfrefine_dist.cli", "run", "--config", str(config), *overrides]
    driver = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killer = Killer(driver, run_dir, SEED)
    killer.start()
    try:
        output, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    killer.join(30)
    print(f"soak kills (round, call, pid): {killer.kills}")
    assert driver.returncode == 0, output[-8000:]
    assert len(killer.kills) >= ROUNDS and sum(call == "generate" for _, call, _ in killer.kills) >= ROUNDS // 2

    questions = load_slices(load_config(str(config), overrides).data.train)
    retried = 0
    for r in range(1, ROUNDS + 1):
        out = run_dir / "rounds" / f"round_{r:02d}"
        start = (r - 1) * QUESTIONS_PER_ROUND % len(questions)
        expected = [questions[(start + i) % len(questions)] for i in range(QUESTIONS_PER_ROUND)]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        # every question of the round exactly once: K paths, indices 0..K-1, none from another question
        assert Counter(s["uid"] for s in samples) == {ex.uid: K for ex in expected}, f"round {r}"
        assert sorted((s["uid"], s["index"]) for s in samples) == sorted((ex.uid, i) for ex in expected for i in range(K))
        assert {s["model_version"] for s in samples} == {r - 1}
        report = json.loads((out / "sample_report.json").read_text())
        assert report["questions"] == QUESTIONS_PER_ROUND and report["paths"] == len(samples)
        assert report["sample_accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        retried += report["retried_work_items"]

        # pairs: the demonstration over a path that was sampled, for that question, and scored incorrect
        pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
        incorrect = {(s["uid"], s["text"]) for s in samples if not s["correct"]}
        demonstration = {ex.uid: get_task(ex.task).target_response(ex, "cot") for ex in expected}
        for p in pairs:
            assert (p["uid"], p["rejected"]) in incorrect, f"round {r}: a pair's rejected path is not a sample"
            assert p["chosen_source"] == "teacher" and p["chosen"] == demonstration[p["uid"]]
        assert len({(p["uid"], p["rejected"]) for p in pairs}) == len(pairs)  # no duplicate pairs
        assert json.loads((out / "pair_report.json").read_text())["pairs_kept"] == len(pairs)

        summary = json.loads((out / "summary.json").read_text())
        dpo = (out / "dpo_metrics.jsonl").read_text().splitlines()
        assert summary["round"] == r and summary["pairs_kept"] == len(pairs) and summary["paths"] == len(samples)
        assert summary["dpo_steps"] == len(dpo) >= 1 and summary["retried_work_items"] == report["retried_work_items"]
        assert (out / "model" / "config.json").is_file()
    assert retried >= 1  # the kills inside generate cost work items, and they were redone
    assert json.loads((run_dir / "final.json").read_text())["label"] == f"round_{ROUNDS}"
    assert (run_dir / "eval" / f"round_{ROUNDS}.json").is_file()
