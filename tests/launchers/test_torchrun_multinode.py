"""The multi-node launchers, each "node" a launcher process on this machine, rendezvous on 127.0.0.1:

- launchers/sft_torchrun_multinode.sh run twice (NNODES=2, NODE_RANK=0/1, one process per node): SFT;
- launchers/dpo_deepspeed_hostfile.sh run twice with NODE_RANK=0/1 on a two-host hostfile (deepspeed
  --no_ssh: every host starts its own share, no ssh): DPO on a pairs file;
- launchers/sft_deepspeed_hostfile.sh with a one-line hostfile `localhost slots=2`: two local ranks, no ssh.

What runs on several real machines with passwordless ssh (deepspeed reaching the other hosts with pdsh)
is not tested here: this machine has no ssh server.
"""
import json
import shutil
import time

import pytest

from launcher_helpers import LAUNCHERS, Node, free_port, launcher_env, metrics_rows, report, run_nodes, write_config

pytestmark = pytest.mark.slow

TIMEOUT_S = 600


def model_files(model_dir):
    return sorted(p.name for p in model_dir.iterdir())


def two_nodes(name, launcher, args, tmp_path, **env):
    """The same launcher started as node 0 and node 1 of a two-node job on 127.0.0.1."""
    port = str(free_port())
    return [Node(f"{name}-node{rank}", [str(LAUNCHERS / launcher), *args],
                 launcher_env(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env),
                 tmp_path / f"{name}-node{rank}.log")
            for rank in (0, 1)]


def test_sft_torchrun_two_nodes(tiny_model_dir, tmp_path):
    config, run_dir = write_config(tmp_path / "tiny.yaml", tiny_model_dir), tmp_path / "run"
    t0 = time.perf_counter()
    nodes = two_nodes("sft", "sft_torchrun_multinode.sh", [str(config), f"run.dir={run_dir}"], tmp_path,
                      NNODES="2", GPUS_PER_NODE="1")
    codes = run_nodes(nodes, TIMEOUT_S)
    print(f"two-node torchrun SFT: {time.perf_counter() - t0:.0f} s")
    assert codes == [0, 0], report(nodes)

    node0, node1 = (n.output() for n in nodes)
    # One rank per node, one world: 8 examples / (micro-batch 2 x world 2) = 2 steps (4 on a world of 1).
    assert "2 steps/epoch, 2 steps, global batch 4, world 2" in node0, report(nodes)
    rows = metrics_rows(run_dir, "sft")
    assert [r["step"] for r in rows] == [1, 2]  # logged once, by global rank 0
    assert all(r["loss"] > 0 for r in rows)
    # Exported once, by global rank 0 (node 0), and complete.
    assert node0.count("exported") == 1 and "exported" not in node1, report(nodes)
    assert {"config.json", "model.safetensors"} <= set(model_files(run_dir / "sft" / "model"))
    assert (run_dir / "config.yaml").is_file()


def test_dpo_deepspeed_hostfile_two_nodes_without_ssh(tiny_model_dir, tmp_path):
    config, run_dir = write_config(tmp_path / "tiny.yaml", tiny_model_dir), tmp_path / "run"
    shutil.copytree(tiny_model_dir, run_dir / "sft" / "model")  # DPO starts from <run.dir>/sft/model
    pairs = write_pairs(tiny_model_dir, tmp_path / "pairs.jsonl", 8)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two hosts, one slot each\nnode0 slots=1\nnode1 slots=1\n")
    t0 = time.perf_counter()
    nodes = two_nodes("dpo", "dpo_deepspeed_hostfile.sh",
                      [str(hostfile), str(config), f"run.dir={run_dir}", f"dpo.pairs_file={pairs}"], tmp_path)
    codes = run_nodes(nodes, TIMEOUT_S)
    print(f"two-node deepspeed (--no_ssh) DPO: {time.perf_counter() - t0:.0f} s")
    assert codes == [0, 0], report(nodes)

    node0, node1 = (n.output() for n in nodes)
    # Each launcher started its own host's share (--no_ssh --node_rank i): one rank each, one world.
    for rank, out in enumerate((node0, node1)):
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in out and "dist_world_size=2" in out, report(nodes)
    # 8 pairs / (micro-batch 2 x world 2) = 2 steps.
    assert "dpo: 8 pairs (dropped none), 2 steps, world 2" in node0, report(nodes)
    rows = metrics_rows(run_dir, "dpo")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] < rows[0]["loss"]  # lr 1e-3 on 8 easy pairs: the second step already gains
    assert node0.count("exported") == 1 and "exported" not in node1, report(nodes)
    assert {"config.json", "model.safetensors"} <= set(model_files(run_dir / "dpo" / "model"))


def test_sft_deepspeed_hostfile_localhost(tiny_model_dir, tmp_path):
    """A one-line hostfile runs its slots locally: no ssh check, master 127.0.0.1."""
    config, run_dir = write_config(tmp_path / "tiny.yaml", tiny_model_dir), tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    t0 = time.perf_counter()
    node = Node("localhost", [str(LAUNCHERS / "sft_deepspeed_hostfile.sh"), str(hostfile), str(config),
                              f"run.dir={run_dir}"],
                launcher_env(MASTER_PORT=str(free_port())), tmp_path / "localhost.log")
    codes = run_nodes([node], TIMEOUT_S)
    print(f"deepspeed hostfile (localhost slots=2) SFT: {time.perf_counter() - t0:.0f} s")
    assert codes == [0], report([node])
    out = node.output()
    assert "dist_world_size=2" in out and "2 steps/epoch, 2 steps, global batch 4, world 2" in out, report([node])
    assert [r["step"] for r in metrics_rows(run_dir, "sft")] == [1, 2]
    assert out.count("exported") == 1
    assert (run_dir / "sft" / "model" / "model.safetensors").is_file()


def write_pairs(model_dir, path, count):
    """Preference pairs in the PreferencePair JSONL format (selfrefine_dist/refine/records.py)."""
    from selfrefine_dist.models.loading import load_tokenizer
    from selfrefine_dist.refine.records import PreferencePair

    tokenizer = load_tokenizer(str(model_dir))
    rows = []
    for i in range(count):
        a, b = 3 + i, 4 + 2 * i
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                               tokenize=False, add_generation_prompt=True)
        rows.append(PreferencePair(uid=f"q{i}", task="gsm8k", prompt=prompt,
                                   chosen=f"{a} + {b} = {a + b}. The answer is {a + b}.",
                                   rejected=f"The answer is {a + b + 1}.", chosen_source="teacher",
                                   rejected_source="cot_incorrect"))
    path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in rows))
    return path
