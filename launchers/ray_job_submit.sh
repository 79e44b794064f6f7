#!/usr/bin/env bash
# Submit the whole method (`selfrefine run`) to an existing Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://head-node:8265 launchers/ray_job_submit.sh configs/gpu_qwen2.5_1.5b.yaml [key=value ...]
#
# The driver runs on the cluster and joins it (ray.address=auto); sampler and learner actors are
# placed by Ray. The working directory is uploaded; the cluster's nodes need the same Python
# environment (`make install-gpu`). Put run.dir on a filesystem every node sees (checkpoints and
# exported models are written by the actors). Watch with `ray job logs -f <id>` or in W&B.
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}
shift
exec ray job submit --address "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://head:8265}" \
  --working-dir . \
  --runtime-env-json '{"env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}}' \
  -- python -m selfrefine_dist.cli run --config "$config" ray.address=auto "$@"
