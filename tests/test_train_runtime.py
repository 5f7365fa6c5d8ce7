"""One Runtime for pretraining and evaluation: device, ranks, precision, DDP wrap."""
import pytest
import torch
from torch import nn

from mscn.errors import MscnError
from mscn.train.distributed import DistInfo
from mscn.train.runtime import Runtime, amp_dtype, setup_runtime, wrap_ddp


@pytest.mark.parametrize("precision, dtype", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_precision_follows_train_precision_on_cpu(precision, dtype):
    rt = setup_runtime("cpu", precision)
    assert rt.device == torch.device("cpu") and rt.dtype is dtype and rt.is_main
    assert rt.dtype == amp_dtype(precision, rt.device)
    x = torch.randn(2, 4)
    with rt.autocast():
        y = nn.Linear(4, 3)(x)
    assert y.dtype == (dtype or torch.float32)


def test_single_process_needs_no_ddp_and_splits_the_batch():
    rt = Runtime(DistInfo(), torch.device("cpu"))
    m = nn.Linear(2, 2)
    assert rt.wrap_ddp(m) is m and wrap_ddp(m, rt.device, DistInfo()) is m
    assert rt.per_rank(256) == 256
    assert Runtime(DistInfo(0, 4, 0), torch.device("cpu")).per_rank(256) == 64
    with pytest.raises(MscnError, match="--batch 10: must be divisible by the world size \\(4\\)"):
        Runtime(DistInfo(0, 4, 0), torch.device("cpu")).per_rank(10)
    with pytest.raises(MscnError, match="--device gpu: must be auto, cuda or cpu"):
        setup_runtime("gpu")


@pytest.mark.parametrize("env, msg", [
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29711"},
     "RANK=5 with WORLD_SIZE=2: a rank must be in [0, WORLD_SIZE)"),  # waited forever without a word
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set"),  # a traceback
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': not an integer"),
])
def test_a_launch_the_group_could_never_form_is_one_line(monkeypatch, env, msg):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(MscnError, match=msg.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        setup_runtime("cpu")


def test_a_rank_waiting_for_the_others_says_so(tmp_path):
    """Rank 0 of 2 whose peer never starts: after WAIT_NOTE_S it says where it waits, once."""
    import subprocess
    import sys

    code = ("import mscn.train.distributed as d; d.WAIT_NOTE_S = 0.3; "
            f"d.init_distributed('cpu', init_method='file://{tmp_path / 'init'}', rank=0, world_size=2)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=8)
        err = proc.stderr
    except subprocess.TimeoutExpired as e:  # still waiting, as it should: read what it said
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    assert err.count("[mscn] rank 0: waiting for the other 1 rank(s) at file://") == 1, err


def test_a_stray_rank_without_world_size_is_one_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")  # left over in a shell: ran as one process before, still does
    rt = setup_runtime("cpu")
    assert (rt.dist.rank, rt.dist.world_size) == (0, 1)
