#!/usr/bin/env bash
# `selfrefine sft|dpo` on the hosts of a deepspeed hostfile, one process per slot (the sft_ and dpo_
# wrappers call this). Three ways to run it:
#
#   launchers/deepspeed_hostfile.sh sft HOSTFILE CONFIG [key=value ...]
#       on the first host; deepspeed reaches the others over passwordless ssh (pdsh) and asks the
#       first host for its address (`hostname -I`) unless MASTER_ADDR is set.
#   NODE_RANK=i MASTER_ADDR=host0 launchers/deepspeed_hostfile.sh sft HOSTFILE CONFIG [key=value ...]
#       on every host, i = its line in the hostfile (0 first): no ssh at all (deepspeed --no_ssh),
#       like torchrun.
#   a hostfile of one line: a local launch of that host's slots; no ssh, MASTER_ADDR defaults to 127.0.0.1.
#
# Every process runs `python -m selfrefine_dist.cli COMMAND` with RANK/WORLD_SIZE set, so it trains
# directly (distributed.nproc_per_node is ignored under a launcher). Every host needs the same
# environment, and run.dir on a shared filesystem (checkpoints are written by every rank).
# DRY_RUN=1 prints the deepspeed command instead of running it.
set -euo pipefail
usage="usage: $0 sft|dpo HOSTFILE CONFIG [key=value ...]"
command=${1:?$usage}
hostfile=${2:?$usage}
config=${3:?$usage}
shift 3
[[ -f $hostfile ]] || { echo "$0: no hostfile $hostfile" >&2; exit 2; }

# Lines of the hostfile that name a host (deepspeed skips blanks and comments the same way).
hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile" || true)
args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
if [[ -n ${NODE_RANK:-} ]]; then
  : "${MASTER_ADDR:?with NODE_RANK set MASTER_ADDR to the address of the first host}"
  args+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
elif (( hosts == 1 )); then
  # deepspeed launches a single host locally but would still check ssh to it and ask it for its address.
  args+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
elif [[ -n ${MASTER_ADDR:-} ]]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
# Without this each process starts one thread per core and they fight (CPU learners); GPU learners
# do not care.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

cmd=(deepspeed "${args[@]}" --module selfrefine_dist.cli "$command" --config "$config" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
