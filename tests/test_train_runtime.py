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
