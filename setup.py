"""Install the R1 recipe: the top-level packages and the train.py CLI.

Install the CPU build of torch first (`pip install torch==2.13.0`) or a CUDA build of the same
version on GPU machines; an unpinned torch requirement would otherwise pull the newest CUDA wheel.
"""
from setuptools import setup

PACKAGES = ["model", "kernels", "sampling", "evaluation", "verify", "sft", "rl", "data", "runtime", "recipes", "serve",
            "envs"]

setup(
    name="r1-recipe",
    version="0.1.0",
    description="The DeepSeek-R1 recipe (GRPO, cold-start SFT, rejection sampling, distillation, "
                "evaluation) as one readable PyTorch codebase",
    python_requires=">=3.10",
    packages=PACKAGES,
    py_modules=["train"],
    install_requires=[
        "torch>=2.6",
        'triton>=3.2; platform_system == "Linux"',
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "sympy>=1.13",
        "jinja2>=3.1",  # checkpoints' own chat templates
        "pyyaml>=6",    # --config recipe files
    ],
    extras_require={
        # transformers is a test oracle only: no package code imports it
        # matplotlib: the recipe test checks its plots; openai: the server's tests use the real client
        # peft: the LoRA tests' oracle
        # wandb, tensorboard: the trackers' tests read back what --report-to writes
        # pyarrow: Parquet data files in and out (data/), which reading needs anyway
        "test": ["pytest>=8", "transformers>=4.50", "matplotlib>=3.8", "openai>=1.40", "peft>=0.13", "wandb>=0.17",
                 "tensorboard>=2.14", "pyarrow>=14"],
        # --report-to wandb,tensorboard
        "track": ["wandb>=0.17", "tensorboard>=2.14"],
        # side-by-side comparisons in bench/
        "bench": ["transformers>=4.50", "trl>=0.20"],
        "plot": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["r1-train=train:main"]},
)
