#!/usr/bin/env bash
# Multi-node DPO on a file of preference pairs with the deepspeed launcher (outside the Ray loop):
#
#   launchers/dpo_deepspeed_hostfile.sh launchers/hostfile.example configs/x.yaml \
#       dpo.pairs_file=runs/x/rounds/round_01/pairs.jsonl [key=value ...]
#
# Starts from <run.dir>/sft/model and exports <run.dir>/dpo/model. Same ways to run as
# sft_deepspeed_hostfile.sh (see deepspeed_hostfile.sh); run.dir on a shared filesystem.
set -euo pipefail
exec "$(dirname "$0")/deepspeed_hostfile.sh" dpo "$@"
