#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh, made HERE (pip reaches the registry) for the GPU machine: Python 3.12,
# x86-64, no network. They travel in the working tree (the device tool's limit: 64 MiB in all, the
# repository included), e.g. `carry: [".gpu_wheels"]`, and gpu_check.sh installs those whose distribution
# is missing (or older) there with `pip install --no-index --no-deps --target DIR`, DIR on PYTHONPATH.
#
#   scripts/gpu_wheels.sh       -> .gpu_wheels/*.whl (GPU_WHEELS=DIR elsewhere), then the total size
#
# Only what the machine's image lacks (its package list: torch, triton, transformers, accelerate, peft,
# pandas, pyarrow, einops, msgpack, ninja, py-cpuinfo, psutil, fsspec, xxhash... are there):
#   deepspeed 0.19.8 and its hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection, and
#     typing-extensions, which pydantic wants at >= 4.16); DeepSpeed has no wheel on PyPI, so
#     `pip wheel --no-deps deepspeed==0.19.8` builds one here: pure Python, no op compiled (they
#     compile just in time there, with its nvcc and ninja);
#   omegaconf (the config loader; it vendors antlr4);
#   liger-kernel 0.8.5 (the log-prob benchmark's peer);
#   trl 1.16.0 with datasets, dill, multiprocess (the DPO throughput peer);
#   setuptools 78.1.1, used only if the image's is older: `pip install -e .` there (kernels/ installs as
#     selfrefine_dist.kernels through setuptools' editable finder, which older versions lack).
# Versions: the ones this repository's CPU venv runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${GPU_WHEELS:-.gpu_wheels}
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT_DIR" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 omegaconf==2.4.0 liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 setuptools==78.1.1
"$PYTHON" -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$OUT_DIR"

ls -l "$OUT_DIR"/*.whl | awk '{print $5, $9}'
total=$(cat "$OUT_DIR"/*.whl | wc -c)
echo "$(ls "$OUT_DIR"/*.whl | wc -l) wheels, $total bytes ($(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB) in $OUT_DIR"
