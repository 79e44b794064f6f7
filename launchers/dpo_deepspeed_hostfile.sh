#!/usr/bin/env bash
# Multi-node DPO on a file of preference pairs with the deepspeed launcher (outside the Ray loop):
#
#   launchers/dpo_deepspeed_hostfile.sh launchers/hostfile.example configs/x.yaml \
#       dpo.pairs_file=runs/x/rounds/round_01/pairs.jsonl [key=value ...]
#
# Starts from <run.dir>/sft/model and exports <run.dir>/dpo/model. Same requirements as
# sft_deepspeed_hostfile.sh: the same checkout on every host, run.dir on a shared filesystem.
set -euo pipefail
hostfile=${1:?usage: $0 HOSTFILE CONFIG [key=value ...]}
config=${2:?usage: $0 HOSTFILE CONFIG [key=value ...]}
shift 2
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
  --module selfrefine_dist.cli dpo --config "$config" "$@"
