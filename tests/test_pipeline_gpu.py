"""The GPU path (``device="mixed"`` decode, GPU ops) against its CPU twin; skipped without CUDA."""
import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.config import IMAGENET_STD
from mscn.highpass import highpass_torch
from mscn.pipelines import build_train_loader, eval_pipeline, resolve_source
from mscn.pipelines.ops import decode

pytestmark = pytest.mark.gpu


def _eval_outputs(root, device, hp, **kw):
    pipe = eval_pipeline(resolve_source(str(root)), image_size=64, resize=72, highpass=hp, device=device,
                         batch_size=16, num_threads=2, device_id=0 if device == "gpu" else None, seed=0, **kw)
    pipe.build()
    views = pipe.run()[0]
    return np.array((views.as_cpu() if device == "gpu" else views).as_array())


@pipeline_def(batch_size=16, num_threads=2, seed=0)
def _decoded(root, device, hw_decoder_load):
    encoded, _ = fn.readers.file(file_root=str(root), random_shuffle=False)
    return decode(encoded, device, hw_decoder_load)


def _decode_gap(root, hw_decoder_load, crop: int = 64) -> float:
    """Mean |GPU - CPU| of the decoded uint8 pixels of the same files (0-255 scale), over
    the centered ``crop`` window that the eval view keeps (resize to 72 is a no-op here)."""
    out = []
    for device in ("gpu", "cpu"):
        pipe = _decoded(root, device, hw_decoder_load, device_id=0 if device == "gpu" else None)
        pipe.build()
        images = pipe.run()[0]
        out.append([np.asarray(x, dtype=np.float64) for x in (images.as_cpu() if device == "gpu" else images)])
    gaps = []
    for a, b in zip(*out):
        y, x = (a.shape[0] - crop) // 2, (a.shape[1] - crop) // 2
        gaps.append(np.abs(a - b)[y:y + crop, x:x + crop].mean())
    return float(np.mean(gaps))


def test_gpu_eval_matches_cpu_on_lossless_images_and_torch_highpass(tmp_path):
    """PNG decodes to the same pixels on both paths, so whatever differs is ours
    (resize, normalize, high-pass on the GPU vs the CPU): it must be float rounding."""
    root = make_folder(tmp_path, classes=2, per_class=8, size=(96, 72), ext="png")
    gpu, cpu = _eval_outputs(root, "gpu", (5.0, 31)), _eval_outputs(root, "cpu", (5.0, 31))
    raw = _eval_outputs(root, "gpu", None)
    ref = highpass_torch(torch.from_numpy(raw).double(), 5.0, 31).numpy()
    assert np.linalg.norm(gpu - ref) / np.linalg.norm(ref) < 1e-3  # §5.1 high-pass, float64 reference
    # resize rounds to uint8 on each device: an occasional 1-level difference is 1/std ~ 0.017
    assert np.abs(gpu - cpu).mean() < 2e-3


@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
def test_gpu_eval_matches_cpu_on_jpegs_up_to_the_decoders_difference(tmp_path, hw_decoder_load):
    """JPEG: nvJPEG (CUDA or hardware) and libjpeg-turbo upsample chroma and round the
    IDCT differently, so the decoded pixels differ by ``gap`` levels on average. The rest
    of the pipeline must not add to it: resize and crop average (they do not grow a mean
    absolute difference), the high-pass ``I - G`` at most doubles it, and normalization
    divides it by std, so mean |GPU - CPU| <= 2 * gap / min(std) (+ the PNG case's rounding)."""
    root = make_folder(tmp_path, classes=2, per_class=8, size=(96, 72))
    gap = _decode_gap(root, hw_decoder_load)
    kw = dict(hw_decoder_load=hw_decoder_load)
    gpu, cpu = _eval_outputs(root, "gpu", (5.0, 31), **kw), _eval_outputs(root, "cpu", (5.0, 31), **kw)
    diff = np.abs(gpu - cpu).mean()
    print(f"hw_decoder_load {hw_decoder_load}: decoded mean |GPU - CPU| {gap:.3f} levels, "
          f"high-passed view {diff:.4f} (bound {2 * gap / min(IMAGENET_STD) + 2e-3:.4f})")
    assert diff <= 2 * gap / min(IMAGENET_STD) + 2e-3
    assert np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1] > 0.98


def test_gpu_train_loader_yields_cuda_batches(tmp_path):
    root = make_folder(tmp_path, classes=2, per_class=8)
    # zero fill only (p_noise=0), so the exact-zero count below measures the masks alone
    cfg = tiny_cfg(root, "train.global_batch=8", "data.output_dtype=bfloat16", "views.0.mask.p_noise=0.0")
    batch = next(iter(build_train_loader(cfg, device=torch.device("cuda", 0))))
    assert all(v.is_cuda and v.dtype == torch.bfloat16 and v.shape == (8, 3, 32, 32) for v in batch.views)
    assert batch.labels.is_cuda and batch.index.is_cuda
    assert (batch.views[0] == 0).float().mean().item() > 0.02  # masked by the Triton kernel
