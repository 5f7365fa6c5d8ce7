"""High-pass (paper §5.1): torch, BLAS and DALI implementations vs a float64 scipy reference.

Border mode is reflect-101 everywhere (mscn/highpass.py), so the comparison holds on
the whole image; the issue asks for < 1e-3 relative error away from the borders.
"""
import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from pipeline_fixtures import make_folder

from mscn.config import IMAGENET_MEAN, IMAGENET_STD, highpass_window
from mscn.highpass import gaussian_kernel, highpass_matmul, highpass_reference_f64, highpass_torch
from mscn.pipelines import resolve_source
from mscn.pipelines.ops import decode, highpass, normalize, normalize_highpass


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("hw,sigma", [((40, 52), 2.0), ((9, 6), 5.0), ((1, 5), 1.0)])
def test_torch_and_matmul_match_float64_reference(hw, sigma):
    """Also for images smaller than the window (reflected more than once)."""
    win = highpass_window(sigma)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 60
    ref = np.stack([highpass_reference_f64(xi.numpy(), sigma, win, channel_axis=0) for xi in x])
    assert rel_err(highpass_torch(x, sigma, win).numpy(), ref) < 1e-5
    assert rel_err(highpass_matmul(x, sigma, win).numpy(), ref) < 1e-5


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-3), (torch.bfloat16, None)])
def test_matmul_in_half_precision_on_view_sized_images(dtype, bound):
    """The loader's GEMMs on float16 views (the GPU path, pipelines/loader.dali_dtype) stay
    within the 1e-3 bound at the training size; bfloat16 (8-bit mantissa) does not, which
    is why bfloat16 views are filtered in float32."""
    win = highpass_window(5.0)
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(2, 3, 224, 224, generator=g), 5, 1, 2) * 3
    x = (smooth + 0.2 * torch.randn(2, 3, 224, 224, generator=g)).to(dtype)  # normalized-unit views
    ref = np.stack([highpass_reference_f64(xi.double().numpy(), 5.0, win, channel_axis=0) for xi in x])
    err = rel_err(highpass_matmul(x, 5.0, win).double().numpy(), ref)
    if bound is not None:
        assert err < bound
    else:
        assert err > 1e-3  # the reason for the float32 route, measured


def test_loader_filters_float16_views_in_float16_only_on_a_gpu():
    from mscn.pipelines.loader import dali_dtype

    assert dali_dtype("float16", gpu=True, filters_in_loader=True) == "float16"
    assert dali_dtype("float16", gpu=False, filters_in_loader=True) == "float32"  # CPU BLAS: float32
    assert dali_dtype("bfloat16", gpu=True, filters_in_loader=True) == "float32"
    assert dali_dtype("bfloat16", gpu=True, filters_in_loader=False) == "float32"
    assert dali_dtype("float16", gpu=True, filters_in_loader=False) == "float16"
    assert dali_dtype("float32", gpu=False, filters_in_loader=True) == "float32"


def test_kernel_is_normalized_gaussian():
    k = gaussian_kernel(5.0, 31)
    assert k.shape == (31,) and abs(k.sum() - 1) < 1e-12 and k.argmax() == 15
    assert np.allclose(k, k[::-1]) and np.isclose(k[15 + 5] / k[15], np.exp(-0.5))


def test_highpass_commutes_with_normalization():
    """blur(const) = const under reflect-101, so hp(norm(x)) = hp(x) / std exactly."""
    x = torch.rand(1, 3, 24, 30) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    a = highpass_torch((x - mean) / std, 5.0, 31)
    b = highpass_torch(x, 5.0, 31) / std
    assert (a - b).abs().max() < 1e-4


@pipeline_def(batch_size=6, num_threads=1, device_id=None)
def _normalized_and_highpassed(source, sigma, window):
    encoded, _ = fn.readers.file(file_root=source.root, files=list(source.files))
    x = normalize(decode(encoded), IMAGENET_MEAN, IMAGENET_STD, 0, types.FLOAT)
    return x, highpass(x, sigma, window)


@pytest.mark.parametrize("sigma", [5.0, 1.5])
def test_dali_highpass_matches_float64_reference_on_jpegs(tmp_path, sigma):
    """DALI's fn.gaussian_blur on decoded, normalized JPEGs vs scipy in float64."""
    source = resolve_source(str(make_folder(tmp_path, classes=2, per_class=3, size=(80, 60))))
    win = highpass_window(sigma)
    pipe = _normalized_and_highpassed(source, sigma, win)
    pipe.build()
    xs, hps = pipe.run()
    r = win // 2
    for i in range(len(xs)):
        x, hp = np.array(xs[i]), np.array(hps[i])
        ref = highpass_reference_f64(x, sigma, win, channel_axis=0)
        assert rel_err(hp[:, r:-r, r:-r], ref[:, r:-r, r:-r]) < 1e-3  # the criterion
        assert rel_err(hp, ref) < 1e-3  # and the borders: DALI's border is reflect-101 too


@pipeline_def(batch_size=6, num_threads=1, device_id=None)
def _views_fused(source, sigma, window, crop, dtype):
    encoded, _ = fn.readers.file(file_root=source.root, files=list(source.files))
    x = decode(encoded)
    flip = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
    plain = normalize(x, IMAGENET_MEAN, IMAGENET_STD, flip, types.FLOAT, crop)
    return plain, normalize_highpass(x, IMAGENET_MEAN, IMAGENET_STD, flip, (sigma, window), dtype, crop)


@pytest.mark.parametrize("crop,dtype", [(None, "float32"), (40, "float32"), (None, "float16")])
def test_highpass_before_normalization_equals_highpass_of_normalized_view(tmp_path, crop, dtype):
    """The views' fused path, blur(uint8) -> subtract -> 1/std + flip + CHW + cast in one pass,
    against the float64 high-pass of the normalized (flipped, cropped) view: §5.1's order."""
    source = resolve_source(str(make_folder(tmp_path, classes=2, per_class=3, size=(80, 60))))
    sigma, win = 5.0, highpass_window(5.0)
    pipe = _views_fused(source, sigma, win, crop, dtype)
    pipe.build()
    plains, fused = pipe.run()
    for i in range(len(plains)):
        x, hp = np.array(plains[i]), np.array(fused[i])
        assert hp.dtype == (np.float16 if dtype == "float16" else np.float32) and hp.shape == x.shape
        ref = highpass_reference_f64(x, sigma, win, channel_axis=0)
        assert rel_err(hp.astype(np.float64), ref) < (1e-3 if dtype == "float16" else 1e-5)
