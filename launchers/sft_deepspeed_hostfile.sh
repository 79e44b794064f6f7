#!/usr/bin/env bash
# Multi-node SFT with the deepspeed launcher: one process per GPU on every host of the hostfile.
#
#   launchers/sft_deepspeed_hostfile.sh launchers/hostfile.example configs/x.yaml [key=value ...]
#
# Run it on the first host; the launcher reaches the others over passwordless ssh and starts
# `python -m selfrefine_dist.cli sft` there with RANK/WORLD_SIZE set, so each process trains
# directly (distributed.nproc_per_node is ignored under a launcher). Every host needs the same
# checkout and environment, and the run directory (run.dir) on a shared filesystem so that
# checkpoints written by every rank are found again on resume.
set -euo pipefail
hostfile=${1:?usage: $0 HOSTFILE CONFIG [key=value ...]}
config=${2:?usage: $0 HOSTFILE CONFIG [key=value ...]}
shift 2
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
  --module selfrefine_dist.cli sft --config "$config" "$@"
