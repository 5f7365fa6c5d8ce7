"""The GPU path (``device="mixed"`` decode, GPU ops) against its CPU twin; skipped without CUDA."""
import numpy as np
import pytest
import torch
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.highpass import highpass_torch
from mscn.pipelines import build_train_loader, eval_pipeline, resolve_source

pytestmark = pytest.mark.gpu


def test_gpu_eval_matches_cpu_and_torch_highpass(tmp_path):
    source = resolve_source(str(make_folder(tmp_path, classes=2, per_class=8, size=(96, 72))))
    out = {}
    for name, device, hp in (("gpu", "gpu", (5.0, 31)), ("gpu_raw", "gpu", None), ("cpu", "cpu", (5.0, 31))):
        pipe = eval_pipeline(source, image_size=64, resize=72, highpass=hp, device=device, batch_size=16,
                             num_threads=2, device_id=0 if device == "gpu" else None, seed=0)
        pipe.build()
        views = pipe.run()[0]
        out[name] = np.array((views.as_cpu() if device == "gpu" else views).as_array())
    ref = highpass_torch(torch.from_numpy(out["gpu_raw"]).double(), 5.0, 31).numpy()
    assert np.linalg.norm(out["gpu"] - ref) / np.linalg.norm(ref) < 1e-3
    # nvJPEG and libjpeg-turbo round chroma differently: close, not equal
    assert np.abs(out["gpu"] - out["cpu"]).mean() < 0.05
    assert np.corrcoef(out["gpu"].ravel(), out["cpu"].ravel())[0, 1] > 0.98


def test_gpu_train_loader_yields_cuda_batches(tmp_path):
    root = make_folder(tmp_path, classes=2, per_class=8)
    # zero fill only (p_noise=0), so the exact-zero count below measures the masks alone
    cfg = tiny_cfg(root, "train.global_batch=8", "data.output_dtype=bfloat16", "views.0.mask.p_noise=0.0")
    batch = next(iter(build_train_loader(cfg, device=torch.device("cuda", 0))))
    assert all(v.is_cuda and v.dtype == torch.bfloat16 and v.shape == (8, 3, 32, 32) for v in batch.views)
    assert batch.labels.is_cuda and batch.index.is_cuda
    assert (batch.views[0] == 0).float().mean().item() > 0.02  # masked by the Triton kernel
