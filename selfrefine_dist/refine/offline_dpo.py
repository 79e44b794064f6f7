"""DPO on a file of preference pairs, outside the Ray loop, under torchrun or the deepspeed launcher:

    deepspeed --hostfile hostfile --module selfrefine_dist.cli dpo --config configs/x.yaml \\
        dpo.pairs_file=runs/x/rounds/round_01/pairs.jsonl

The same learner code as the loop (``refine/learner.py``), one process per rank: the policy starts
from the run's SFT model (``<run>/sft/model``), the reference is that model too, and the result is
exported to ``<run>/dpo/model``.
"""
from __future__ import annotations

import os
from pathlib import Path

from selfrefine_dist import artifacts
from selfrefine_dist.config import Config
from selfrefine_dist.data.sources import DataError
from selfrefine_dist.refine.records import PreferencePair
from selfrefine_dist.tracking import MetricsLogger, config_dict


def read_pairs(path: str) -> list:
    rows = artifacts.read_jsonl(Path(path))
    pairs = []
    for line_no, row in enumerate(rows, 1):
        try:
            pairs.append(PreferencePair(**row))
        except TypeError as e:
            raise DataError(f"{path}: row {line_no}: not a preference pair ({e})") from None
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def run_dpo(cfg: Config, run_dir: Path) -> Path:
    from selfrefine_dist.models.loading import load_tokenizer
    from selfrefine_dist.refine.learner import Learner, learner_spec
    from selfrefine_dist.refine.preference_data import plan_round, tokenize_pairs
    from selfrefine_dist.train.distributed import free_port

    if not cfg.dpo.pairs_file:
        raise DataError("key 'dpo.pairs_file': `selfrefine dpo` needs a JSONL of preference pairs")
    run_dir = Path(run_dir)
    sft_model = str(run_dir / "sft" / "model")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    learner = Learner(rank, world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    learner.setup(learner_spec(cfg, sft_model, world), os.environ.get("MASTER_ADDR", "127.0.0.1"),
                  int(os.environ.get("MASTER_PORT") or free_port()))

    pairs = read_pairs(cfg.dpo.pairs_file)
    examples, dropped = tokenize_pairs(pairs, load_tokenizer(sft_model, cfg.model.trust_remote_code), cfg.data.max_len)
    plan = plan_round(examples, world, cfg.dpo.micro_batch_size, cfg.dpo.grad_accum, cfg.dpo.epochs, cfg.run.seed)
    if plan.steps == 0:
        raise DataError(f"{cfg.dpo.pairs_file}: {len(examples)} usable pairs do not fill one batch of {plan.global_batch}")
    logger = MetricsLogger(run_dir, enabled=rank == 0, wandb_mode=cfg.logging.wandb_mode,
                           wandb_project=cfg.logging.wandb_project, wandb_run_name=cfg.logging.wandb_run_name,
                           config=config_dict(cfg))
    if rank == 0:
        print(f"dpo: {len(examples)} pairs (dropped {dropped or 'none'}), {plan.steps} steps, world {world}", flush=True)
    history = learner.train_round(plan.shards[rank], 1)
    for i, metrics in enumerate(history):
        logger.log(metrics.as_dict(), step=i + 1, stage="dpo")
    learner.save(str(run_dir / "dpo" / "checkpoints"), 1)
    out = run_dir / "dpo" / "model"
    learner.publish_weights(str(out), bucket_bytes=0)
    if rank == 0:
        print(f"dpo: loss {history[0].loss:.4f} -> {history[-1].loss:.4f}; exported {out}", flush=True)
    logger.finish()
    return out
