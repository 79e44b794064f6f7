"""MetricsLogger with W&B offline: one W&B run per run directory, across processes, with the config.

The scenario of ``selfrefine run`` in a sweep is played once (module fixture): the driver logs,
suspends, an SFT "learner" in a real subprocess (naming no run and no group, as ``run_sft`` does) logs
into the same run directory, the driver logs again and finishes, and a rerun of the driver (a new
logger, the config changed by an override) resumes the run.
What W&B recorded is read back from the offline transaction logs (``wandb/offline-run-*/run-<id>.wandb``):
wandb 0.31 writes no ``files/config.yaml`` offline, the config lives in the log's Run and Config records.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from selfrefine_dist.config import load_config
from selfrefine_dist.tracking import RUN_FILE, MetricsLogger, config_dict, read_metrics

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

GROUP, NAME = "sweep-lr", "sweep-lr/demo"
OVERRIDES = ["sft.lr=3e-05", "sampler.temperature_schedule=[1.0, 0.7]"]
RERUN_OVERRIDES = OVERRIDES + ["sft.lr=5e-05"]


def transaction_log(path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB log blocks
    of 32 KiB, each record chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last). wandb 0.31 dropped its Python reader (wandb.sdk.internal.datastore); this is its format."""
    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = header, []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:
            break
        chunks.append(data[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def segments(run_dir):
    """One dict per offline-run folder (one per process that held the run), in start order."""
    out = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        seg = {"run": None, "config": {}, "history": []}
        for record in transaction_log(path):
            kind = record.WhichOneof("record_type")
            if kind == "run" and seg["run"] is None:
                seg["run"] = record.run
                seg["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                seg["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                seg["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
        out.append(seg)
    return sorted(out, key=lambda s: s["run"].start_time.ToNanoseconds())


LEARNER = textwrap.dedent("""
    import json, sys
    from selfrefine_dist.tracking import MetricsLogger
    run_dir, config = sys.argv[1], json.loads(sys.argv[2])
    logger = MetricsLogger(run_dir, wandb_mode="offline", wandb_project="selfrefine-test", config=config)
    for step in (1, 2, 3):
        logger.log({"loss": 2.0 / step, "lr": 3e-05}, step=step, stage="sft")
    logger.finish()
""")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """driver -> suspend -> SFT learner (subprocess) -> driver again -> finish -> rerun; (run dir, driver)."""
    root = tmp_path_factory.mktemp("wandb_offline")
    run_dir = root / "runs" / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        config = config_dict(load_config(overrides=OVERRIDES))
        driver = MetricsLogger(run_dir, wandb_mode="offline", wandb_project="selfrefine-test",
                               wandb_run_name=NAME, config=config, group=GROUP)
        driver.log({"eval_in_domain_accuracy": 0.25, "note": "base model"}, stage="eval/base")
        driver.suspend()
        driver.log({"seconds": 1.5}, stage="timing")  # between suspend and the learner: takes the run back
        driver.suspend()
        subprocess.run([sys.executable, "-c", LEARNER, str(run_dir), json.dumps(config)], check=True,
                       env=os.environ.copy(), timeout=120)
        driver.log({"accuracy": 0.5}, step=1, stage="round")  # resumes the run the learner let go
        driver.finish()
        driver.log({"accuracy": 0.75}, step=2, stage="round")  # after finish: metrics.jsonl only
        rerun = MetricsLogger(run_dir, wandb_mode="offline", wandb_project="selfrefine-test",
                              config=config_dict(load_config(overrides=RERUN_OVERRIDES)))
        rerun.log({"accuracy": 0.8}, step=3, stage="round")
        rerun.finish()
        yield run_dir, driver


def test_resolved_config_reaches_wandb(pipeline_run):
    run_dir, _ = pipeline_run
    cfg = load_config(overrides=OVERRIDES)
    segs = segments(run_dir)
    first = segs[0]["config"]
    assert first["sft"]["lr"] == 3e-05
    assert first["sampler"]["temperature_schedule"] == [1.0, 0.7]
    assert first["data"]["train"][0]["task"] == cfg.data.train[0].task
    # A resumed segment carries the config too (run.config.update), so each offline folder is whole;
    # the rerun's changed value replaces the old one.
    assert [seg["config"]["sft"]["lr"] for seg in segs] == [3e-05] * 4 + [5e-05]
    assert segs[-1]["config"]["sampler"]["temperature_schedule"] == [1.0, 0.7]


def test_one_wandb_run_for_all_processes(pipeline_run):
    run_dir, driver = pipeline_run
    stored = json.loads((run_dir / RUN_FILE).read_text())
    assert stored == {"id": driver.wandb_run_id, "name": NAME, "group": GROUP}
    segs = segments(run_dir)
    # driver (eval/base), driver again (timing), learner (sft), driver resumed (round 1), rerun (round 3)
    assert len(segs) == 5
    assert {seg["run"].run_id for seg in segs} == {stored["id"]}
    assert [seg["run"].project for seg in segs] == ["selfrefine-test"] * 5
    # the learner and the rerun named no run: they kept the driver's name
    assert [seg["run"].display_name for seg in segs] == [NAME] * 5


def test_wandb_steps_are_metrics_lines(pipeline_run):
    """Steps continue across segments (W&B's own counter restarts at 0 in each offline process); line 6
    of metrics.jsonl was logged after finish(), so W&B has no step 6."""
    run_dir, _ = pipeline_run
    rows = [h for seg in segments(run_dir) for h in seg["history"]]
    assert [r["_step"] for r in rows] == [0, 1, 2, 3, 4, 5, 7]
    sft = {"sft/loss", "sft/lr"}
    assert [{k for k in r if not k.startswith("_")} for r in rows] == [
        {"eval/base/eval_in_domain_accuracy"}, {"timing/seconds"}, sft, sft, sft, {"round/accuracy"},
        {"round/accuracy"}]
    assert rows[3]["sft/loss"] == 1.0 and rows[3]["sft/lr"] == 3e-05
    assert "eval/base/note" not in rows[0]  # text stays in metrics.jsonl


def test_group_is_recorded(pipeline_run):
    run_dir, _ = pipeline_run
    assert [seg["run"].run_group for seg in segments(run_dir)] == [GROUP] * 5


def test_metrics_jsonl_gets_every_record(pipeline_run):
    run_dir, _ = pipeline_run
    rows = read_metrics(run_dir)
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("eval/base", None), ("timing", None), ("sft", 1), ("sft", 2), ("sft", 3), ("round", 1), ("round", 2),
        ("round", 3)]
    assert rows[0]["note"] == "base model"
    assert [r["loss"] for r in read_metrics(run_dir, stage="sft")] == [2.0, 1.0, 2.0 / 3]
    assert [r["accuracy"] for r in read_metrics(run_dir, stage="round")] == [0.5, 0.75, 0.8]


@pytest.mark.parametrize("enabled, mode", [(True, "disabled"), (False, "offline")])
def test_no_wandb_files_when_off(tmp_path, monkeypatch, enabled, mode):
    """W&B disabled, or a rank other than 0: no wandb folder, no run id; metrics.jsonl on rank 0 only."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, enabled=enabled, wandb_mode=mode, config={"sft": {"lr": 1e-5}}, group=GROUP)
    logger.log({"loss": 1.0}, step=1, stage="sft")
    logger.suspend()
    logger.log({"loss": 0.5}, step=2, stage="sft")
    logger.finish()
    assert logger.wandb_run_id is None
    assert sorted(p.name for p in run_dir.iterdir()) == (["metrics.jsonl"] if enabled else [])
    assert not (tmp_path / "wandb_dir").exists()
    assert len(read_metrics(run_dir)) == (2 if enabled else 0)


def test_config_dict_is_plain(tmp_path):
    cfg = load_config(overrides=OVERRIDES)
    plain = config_dict(cfg)
    assert json.loads(json.dumps(plain)) == plain
    assert plain["logging"]["wandb_mode"] == cfg.logging.wandb_mode
    assert isinstance(plain["data"]["train"][0], dict)
