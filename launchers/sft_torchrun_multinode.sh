#!/usr/bin/env bash
# Multi-node SFT with torchrun: run this same command on every node, with NODE_RANK set per node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#     launchers/sft_torchrun_multinode.sh configs/x.yaml [key=value ...]
#
# GPUS_PER_NODE is the number of learner processes per node (1 per GPU; any number on CPUs).
# The run directory (run.dir) must be on a shared filesystem.
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}
shift
exec torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" \
  -m selfrefine_dist.cli sft --config "$config" "$@"
