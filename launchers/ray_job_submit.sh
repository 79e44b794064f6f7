#!/usr/bin/env bash
# Submit the whole method (`selfrefine run`) to an existing Ray cluster as a Ray job, and wait for it.
#
#   RAY_ADDRESS=http://head-node:8265 launchers/ray_job_submit.sh configs/gpu_qwen2.5_1.5b.yaml \
#       run.dir=/shared/runs/qwen2.5_1.5b [key=value ...]
#
# The driver runs on the cluster and joins it (ray.address=auto); sampler and learner actors are
# placed by Ray. The code is the selfrefine-dist installed on the cluster's nodes (the same
# environment on every node: `make install-gpu`); only the config file is uploaded (it becomes the
# job's working directory). run.dir must be given as an absolute path on a filesystem every node
# sees: the job's working directory is a temporary folder on the cluster, and checkpoints and
# exported models are written by the actors.
#
# The head needs its dashboard (the job server): `ray start --head --dashboard-host 0.0.0.0`,
# from an install with ray[default] (setup.py). SUBMISSION_ID names the job; NO_WAIT=1 returns
# once it is submitted (then `ray job status|logs|stop <id>`). Exit status: 1 when the job fails.
set -euo pipefail
usage="usage: RAY_ADDRESS=http://head:8265 $0 CONFIG run.dir=/absolute/shared/path [key=value ...]"
config=${1:?$usage}
shift
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://head:8265}"
[[ -f $config ]] || { echo "$0: no config file $config" >&2; exit 2; }
run_dir=
for arg in "$@"; do
  case $arg in run.dir=*) run_dir=${arg#run.dir=} ;; esac
done
if [[ $run_dir != /* ]]; then
  echo "$0: pass run.dir=/an/absolute/path on a filesystem the cluster sees (got '${run_dir}'):" \
    "the job runs in a temporary folder on the cluster, where a relative run.dir would be lost" >&2
  echo "$usage" >&2
  exit 2
fi

# The job's working directory holds the config alone: the code is the cluster's install (see above).
upload=$(mktemp -d)
trap 'rm -rf "$upload"' EXIT
cp "$config" "$upload/"

flags=(--address "$RAY_ADDRESS" --working-dir "$upload"
       --runtime-env-json '{"env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}}')
[[ -n ${SUBMISSION_ID:-} ]] && flags+=(--submission-id "$SUBMISSION_ID")
[[ ${NO_WAIT:-0} == 1 ]] && flags+=(--no-wait)
ray job submit "${flags[@]}" -- \
  python -m selfrefine_dist.cli run --config "$(basename "$config")" ray.address=auto "$@"
