"""``selfrefine <command> --config configs/x.yaml key.sub=value ...``

Commands:
  sft    fine-tune the student on teacher demonstrations (DeepSpeed, ZeRO-3 by default)
  eval   score a model (``--model``, default: the run's SFT model) on ``data.eval``
  run    the whole method: (teach), SFT, evaluation, self-refine rounds (sample, reward, pair, DPO, sync)
  dpo    DPO on a file of preference pairs (dpo.pairs_file), from the run's SFT model
  teach  generate teacher demonstrations for data.train and keep those that match the gold answer
  config print the resolved config and exit
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selfrefine_dist.config import ConfigError, load_config, to_yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfrefine", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["sft", "dpo", "eval", "run", "teach", "config"])
    p.add_argument("--config", help="YAML file in configs/ (schema: selfrefine_dist/config/schema.py)")
    p.add_argument("--model", help="eval: a Hugging Face folder or hub id to score")
    p.add_argument("--label", default=None, help="eval: the name of this model in the results")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def main(argv=None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(to_yaml(cfg))
        return 0

    from selfrefine_dist.data.sources import DataError

    try:
        return _run_command(args, cfg)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2


def _run_command(args, cfg) -> int:
    from selfrefine_dist.launch import run_learners, under_launcher
    from selfrefine_dist.run_dir import resolve_run_dir, write_resolved_config

    run_dir = resolve_run_dir(cfg, args.config)
    cfg.run.dir = str(run_dir)  # the resolved config names its run directory, for learners and reruns
    if args.command in ("sft", "dpo"):  # learner processes: start them, or be one of them
        if not under_launcher() and (cfg.distributed.nproc_per_node > 1 or cfg.distributed.launcher == "deepspeed"):
            config_file = write_resolved_config(cfg, run_dir)
            run_learners(cfg.distributed.launcher, cfg.distributed.nproc_per_node, cfg.distributed.master_port,
                         [args.command, "--config", str(config_file)])
            return 0
        if os.environ.get("RANK", "0") == "0":
            write_resolved_config(cfg, run_dir)
        if args.command == "sft":
            from selfrefine_dist.train.sft import run_sft

            run_sft(cfg, run_dir)
        else:
            from selfrefine_dist.train.dpo import run_dpo

            run_dpo(cfg, run_dir)
        return 0

    config_file = write_resolved_config(cfg, run_dir)
    if args.command == "run":
        from selfrefine_dist.pipeline import run_pipeline

        run_pipeline(cfg, run_dir, config_file)
        return 0
    if args.command == "teach":
        from selfrefine_dist.refine.teach import run_teach_stage

        if not cfg.teach.enabled:
            print("config error: key 'teach.enabled' is false; set teach.enabled=true and teach.model or teach.endpoint",
                  file=sys.stderr)
            return 2
        run_teach_stage(cfg, run_dir)
        return 0
    if args.command == "eval":
        from selfrefine_dist.pipeline import run_eval_command

        model = args.model or str(run_dir / "sft" / "model")
        run_eval_command(cfg, run_dir, model, args.label or Path(model).name)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
