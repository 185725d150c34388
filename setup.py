"""megatron-ling: train Ling 2.0 MoE models on stock Megatron-Core."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
about = {}
with open(os.path.join(here, "megatron_ling", "version.py")) as f:
    exec(f.read(), about)

setup(
    name="megatron-ling",
    version=about["__version__"],
    description="Ling 2.0 (BailingMoeV2) training, conversion and pipeline profiling on Megatron-Core",
    long_description=open(os.path.join(here, "README.md")).read() if os.path.exists(os.path.join(here, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ling", "megatron_ling.*"]),
    package_data={"megatron_ling": ["recipes/*.yaml", "launch/templates/*.sh", "launch/*.sh"]},
    # torch is a requirement but never pinned to a version range that would make pip pull a
    # different (CUDA) build over the one the user already has.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # tested: 0.16.1 and 0.19.2 (tools/bootstrap.sh --mcore)
        "numpy",
        "safetensors>=0.4",
        "pyyaml",
        "tensorboard",
        "tokenizers>=0.15",
        "tqdm",
        "packaging",
        # megatron-core's torch_dist writer needs it (filesystem_async.py _process_memory) but does
        # not declare it; without it every checkpoint save fails inside the writer process.
        "psutil",
        "matplotlib",  # ling-bubbles timeline PNG
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "nvidia-modelopt"],
        "hf": ["transformers>=4.45"],
        "test": ["pytest", "pytest-timeout", "transformers>=4.45", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "ling-train=megatron_ling.training.cli:main",
            "ling-preprocess=megatron_ling.data.cli:main",
            "ling-convert=megatron_ling.convert.cli:main",
            "ling-slurm=megatron_ling.launch.cli:main",
            "ling-plan=megatron_ling.profiling.plan_cli:main",
            "ling-bubbles=megatron_ling.profiling.bubbles_cli:main",
            "ling-params=megatron_ling.models.cli:main",
            "ling-merge=megatron_ling.merge.cli:main",
        ]
    },
)
