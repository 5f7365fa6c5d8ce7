"""Shared test setup.

Triton kernels run on the CPU under TRITON_INTERPRET=1 (CI has no GPU). The variable
must be set before any module that defines a ``@triton.jit`` kernel is imported,
so it is set here, at collection time, unless a GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of tens of seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
