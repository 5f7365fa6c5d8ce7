"""Packaging for mscn.

The repo-root folders are installed under one namespace:
``mscn`` (mscn/), ``mscn.pipelines`` (pipelines/), ``mscn.cuda_kernels``
(cuda_kernels/) and ``mscn.train`` (train/), so nothing generic such as ``train``
lands in site-packages.

DALI flavour: DALI ships one wheel per CUDA major version and the two must never be
installed side by side. ``nvidia-dali-cuda130`` is the default; on a CUDA 12 driver
build with ``MSCN_DALI_CUDA=120 pip install --no-cache-dir .`` (see README).
"""
import os

from setuptools import setup

_DALI_FLAVOURS = {"130": "nvidia-dali-cuda130>=1.52", "120": "nvidia-dali-cuda120>=1.52"}
# `mscn data photos` cuts its dataset from colour photos that ship inside these wheels
# (no download); the tests install them too, so CI runs the photos tests.
_PHOTOS = ["scikit-image>=0.22", "scikit-learn>=1.3"]

_flavour = os.environ.get("MSCN_DALI_CUDA", "130").strip()
if _flavour not in _DALI_FLAVOURS:
    raise SystemExit(
        f"MSCN_DALI_CUDA={_flavour!r} is not supported; use one of {sorted(_DALI_FLAVOURS)}"
    )

PACKAGES = {
    "mscn": "mscn",
    "mscn.data": "mscn/data",
    "mscn.pipelines": "pipelines",
    "mscn.cuda_kernels": "cuda_kernels",
    "mscn.train": "train",
    "mscn.train.eval": "train/eval",
    "mscn.train.ablate": "train/ablate",
    "mscn.configs": "configs",  # the YAML recipes ship inside the package
}

setup(
    name="mscn",
    version="0.1.0",
    description="Masked Siamese ConvNets: DALI input pipeline, Triton mask kernels, SimCLR/BYOL trainer",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"mscn.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19,<1",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pillow>=9",
        "scipy>=1.10",  # mscn data synth (the demo's dataset) deforms its shapes with scipy.ndimage
        _DALI_FLAVOURS[_flavour],
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib>=3.6", *_PHOTOS],
        "photos": _PHOTOS,  # mscn data photos: pip install ".[photos]"
        "plots": ["matplotlib>=3.6"],
        "tensorboard": ["tensorboard>=2.12"],  # train.tensorboard=true: pip install ".[tensorboard]"
    },
    entry_points={"console_scripts": ["mscn=mscn.cli:main"]},
)
