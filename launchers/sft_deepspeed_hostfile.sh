#!/usr/bin/env bash
# Multi-node SFT with the deepspeed launcher: one process per slot on every host of the hostfile.
#
#   launchers/sft_deepspeed_hostfile.sh launchers/hostfile.example configs/x.yaml [key=value ...]
#
# On the first host (the others over passwordless ssh), or with NODE_RANK=i MASTER_ADDR=host0 on
# every host (no ssh); a one-line hostfile runs locally. See deepspeed_hostfile.sh.
# The run directory (run.dir) must be on a shared filesystem.
set -euo pipefail
exec "$(dirname "$0")/deepspeed_hostfile.sh" sft "$@"
