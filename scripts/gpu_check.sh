#!/usr/bin/env bash
# The GPU path, run for real, as one prepared device check (README: "GPU check").
#
#   scripts/gpu_check.sh [ARGS]        GPU machine: install the carried wheels (.gpu_wheels/, made by
#                                      scripts/gpu_wheels.sh), then python -m selfrefine_dist.benchmarks.gpu_check
#                                      ARGS: every section in under 8 minutes on an H200
#   scripts/gpu_check.sh --cpu [ARGS]  the dry run at toy sizes on a CPU machine (gloo, Triton interpreted)
#
# Writes summary.json, summary.md and sections.log into $OUT if set, else gpu_check_out/ (--out DIR).
# Exit status: the check's own (1: a correctness check failed or a section did not finish).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${GPU_WHEELS:-.gpu_wheels}
TARGET=${GPU_WHEELS_TARGET:-/tmp/selfrefine_gpu_site}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/selfrefine/torch_extensions}

cpu=0
for arg in "$@"; do
  if [[ $arg == --cpu ]]; then cpu=1; fi
done

if [[ $cpu == 0 ]]; then
  unset TRITON_INTERPRET DS_ACCELERATOR  # compiled Triton kernels; DeepSpeed picks its CUDA accelerator
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # A carried wheel is installed when its distribution is missing or older there: the image's own
    # torch, transformers, pandas... are never shadowed (none of them is carried).
    wheels=$("$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata, pathlib, sys
from packaging.version import Version
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        if Version(importlib.metadata.version(name)) >= Version(version):
            continue
    except importlib.metadata.PackageNotFoundError:
        pass
    print(wheel)
PY
)
    if [[ -n $wheels ]]; then
      echo "gpu_check: installing into $TARGET:" $(basename -a $wheels)
      # shellcheck disable=SC2086  # one wheel path per word
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" $wheels
    fi
    export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # The package itself: kernels/ installs as selfrefine_dist.kernels (setup.py), so it must be installed.
  if ! "$PYTHON" -c "import selfrefine_dist.kernels" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  fi
fi
exec "$PYTHON" -m selfrefine_dist.benchmarks.gpu_check "$@"
