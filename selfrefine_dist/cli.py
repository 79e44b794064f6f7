"""``selfrefine <command> --config configs/x.yaml key.sub=value ...``

Commands:
  sft    fine-tune the student on teacher demonstrations (DeepSpeed, ZeRO-3 by default)
  eval   score a model (``--model``, default: the run's SFT model) on ``data.eval``
  run    the whole method: (teach), SFT, evaluation, self-refine rounds (sample, reward, pair, DPO, sync)
  dpo    DPO on a file of preference pairs (dpo.pairs_file), from the run's SFT model
  teach  generate teacher demonstrations for data.train and keep those that match the gold answer
  config print the resolved config and exit
  sweep  run a grid of variants, sharing the stages they share, and write sweep.md:
           selfrefine sweep --config X [key=value ...] --grid "dpo.lr=[1.0e-6,5.0e-6]" "dpo.beta=[0.1,0.3]" --seeds 0 1
  compare  paired changes between evaluations (run directories, RUNDIR:LABEL or eval files):
           selfrefine compare runs/a:sft runs/a runs/b
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selfrefine_dist.config import ConfigError, load_config, to_yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfrefine", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["sft", "dpo", "eval", "run", "teach", "config", "sweep", "compare"])
    p.add_argument("--config", help="YAML file in configs/ (schema: selfrefine_dist/config/schema.py)")
    p.add_argument("--model", help="eval: a Hugging Face folder or hub id to score")
    p.add_argument("--label", default=None, help="eval: the name of this model in the results")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfrefine sweep", description="Run a grid of variants (see selfrefine_dist/sweep.py)")
    p.add_argument("--config", required=True)
    p.add_argument("--grid", nargs="+", required=True, help='"key.sub=[v1,v2,...]" ...')
    p.add_argument("--seeds", nargs="+", type=int, default=[], help="run every grid point with each seed")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="an ablation: the config as it is, then each grid value alone (not the product)")
    p.add_argument("--dir", default=None, help="the sweep's folder (default runs/sweep_<config stem>)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every variant")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from selfrefine_dist.eval.compare import compare_main

        return compare_main(argv[1:])
    if argv[:1] == ["sweep"]:
        return _sweep(_sweep_parser().parse_intermixed_args(argv[1:]))
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


def _sweep(args) -> int:
    from selfrefine_dist.data.sources import DataError
    from selfrefine_dist.run_lock import RunDirLocked, hold_run_dir
    from selfrefine_dist.sweep import run_sweep

    root = Path(args.dir or Path("runs") / f"sweep_{Path(args.config).stem}")
    try:
        with hold_run_dir(root, "sweep"):  # one driver per sweep; its variants run in this process
            run_sweep(args.config, args.grid, args.seeds, args.overrides, str(root), args.one_at_a_time)
    except RunDirLocked as e:
        print(f"run directory locked: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_command(args, cfg) -> int:
    from selfrefine_dist.launch import under_launcher
    from selfrefine_dist.run_dir import resolve_run_dir
    from selfrefine_dist.run_lock import RunDirLocked, hold_run_dir

    run_dir = resolve_run_dir(cfg, args.config)
    if args.command in ("sft", "dpo") and under_launcher() and os.environ.get("RANK", "0") != "0":
        return _run_locked(args, cfg, run_dir)  # a launcher's other ranks: rank 0 holds the lock
    try:  # one driver per run directory (run_lock.py); learners started by the driver inherit its lock
        with hold_run_dir(run_dir, args.command):
            return _run_locked(args, cfg, run_dir)
    except RunDirLocked as e:
        print(f"run directory locked: {e}", file=sys.stderr)
        return 2


def _run_locked(args, cfg, run_dir: Path) -> int:
    from selfrefine_dist.launch import run_learners, under_launcher
    from selfrefine_dist.run_dir import write_resolved_config

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
            from selfrefine_dist.refine.offline_dpo import run_dpo

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
