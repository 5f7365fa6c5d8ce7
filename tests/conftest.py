"""Shared test setup.

Triton kernels run on the CPU under TRITON_INTERPRET=1 (CI has no GPU). The variable
must be set before any module that defines a ``@triton.jit`` kernel is imported,
so it is set here, at collection time, unless a GPU is present.
"""
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the data check's stamps (mscn.data.checkstamp) of this session's datasets, not the user's
# ~/.cache; the processes the tests start inherit it
_STAMPS = tempfile.mkdtemp(prefix="mscn-stamps-")
os.environ["MSCN_CACHE_DIR"] = _STAMPS


def pytest_unconfigure(config):
    shutil.rmtree(_STAMPS, ignore_errors=True)


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core box, OpenMP threads that wait on
    each other turn a 0.15 s training step into seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_synth_train(tmp_path_factory):
    """The pretraining tests' dataset, synthesized once per session: 4 classes x 16
    64x48 JPEGs (``train/`` of ``mscn data synth``). Tests only read it."""
    from mscn.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, classes=4, per_class=16, size=(64, 48), seed=0, workers=1, progress=False)
    return out / "train"
