"""Diagnostic figures in the style of the paper's Figs. 1-3, 7 and 8 (PNG, matplotlib).

* :func:`views_figure` (Figs. 1a, 2, 3): an image and its masked views, without and
  with the high-pass. Without it the mask borders are sharp "parasitic edges" (§4);
  after the high-pass a zero-filled cell looks like the surrounding flat regions (§5.1).
* :func:`histogram_figure` (Figs. 1b, 7): colour histograms before/after masking,
  without and with the high-pass: masking piles values onto 0, which is an ordinary
  colour without the high-pass but the mode of the high-passed distribution.
* :func:`kernels_figure` (Figs. 1c, 8): the 64 first-layer 7x7 kernels of a backbone.

The image goes through the evaluation preprocessing (resize, center crop, normalize,
high-pass) with torch on the CPU; the masks are the torch reference of the MSCN masks
with the checkpoint's per-view mask configs.
"""
from __future__ import annotations

from pathlib import Path

from mscn.errors import DataError, MscnError

try:  # an extra (mscn[plots]): without it, one line, not an ImportError's traceback
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (CI, servers)
    import matplotlib.pyplot as plt
except ImportError:
    raise MscnError("mscn eval figures draws with matplotlib, which is not installed: pip install 'mscn[plots]' "
                    "(or pip install matplotlib)") from None

import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402
from torch import nn  # noqa: E402

from mscn.config import Config  # noqa: E402
from mscn.data.imagefolder import is_image_name  # noqa: E402
from mscn.cuda_kernels import apply_masks  # noqa: E402
from mscn.highpass import highpass_torch, highpass_window  # noqa: E402

def find_image(root: str | Path) -> Path:
    """The first image (sorted) below ``root``, for figures drawn from a dataset."""
    root = Path(root)
    if root.is_file():
        return root
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    for p in sorted(root.rglob("*")):
        if p.is_file() and is_image_name(p.name):
            return p
    raise DataError(f"{root}: no image file below this folder (pass --image)")


def load_image(path: str | Path, cfg: Config) -> torch.Tensor:
    """(1, 3, S, S) normalised tensor: resize shorter side, center crop (eval views)."""
    try:
        with Image.open(path) as f:
            img = ImageOps.exif_transpose(f).convert("RGB")  # upright, as DALI's decoder turns it
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        # ValueError: a text chunk above PIL's limit; a decompression bomb: a header claiming gigapixels
        raise DataError(f"{path}: cannot read the image ({e})") from None
    img = TF.center_crop(TF.resize(img, cfg.data.val_resize), cfg.data.image_size)
    x = TF.pil_to_tensor(img).float().unsqueeze(0)  # 0..255, as DALI's normalize sees it
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _highpass(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    return highpass_torch(x, cfg.highpass.sigma, highpass_window(cfg.highpass.sigma, cfg.highpass.window))


def masked_views(x: torch.Tensor, cfg: Config, seed: int = 0) -> list[torch.Tensor]:
    """One masked copy of ``x`` per configured view (same seed -> same masks for any x)."""
    g = torch.Generator().manual_seed(seed)
    views = [x.clone() for _ in cfg.views]
    return apply_masks(views, [v.mask for v in cfg.views], g, inplace=True, backend="torch")


def _show_rgb(x: torch.Tensor, cfg: Config):
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    return ((x[0] * std + mean) / 255).clamp(0, 1).permute(1, 2, 0).numpy()


def _show_hp(x: torch.Tensor, scale: float):
    # one fixed contrast for every high-passed panel, 0 -> mid-grey
    return (0.5 + x[0] / (2 * scale)).clamp(0, 1).permute(1, 2, 0).numpy()


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def views_figure(image: str | Path, cfg: Config, out: str | Path, seed: int = 0) -> Path:
    """Grid: top row image + masked views, bottom row high-passed + masked high-passed."""
    x = load_image(image, cfg)
    hp = _highpass(x, cfg)
    plain_views, hp_views = masked_views(x, cfg, seed), masked_views(hp, cfg, seed)
    scale = 3 * float(hp.std()) + 1e-6
    n = 1 + len(cfg.views)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6))
    panels = [[(_show_rgb(x, cfg), "image")] + [(_show_rgb(v, cfg), f"view {i} masked")
                                                 for i, v in enumerate(plain_views)],
              [(_show_hp(hp, scale), f"high-pass σ={cfg.highpass.sigma:g}")]
              + [(_show_hp(v, scale), f"view {i} HP + mask") for i, v in enumerate(hp_views)]]
    for row, items in zip(axes, panels):
        for ax, (img, title) in zip(row, items):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _save(fig, Path(out))


def histogram_figure(image: str | Path, cfg: Config, out: str | Path, seed: int = 0, view: int = 0) -> Path:
    """Per-channel histograms of (normalized, masked) and (high-passed, HP + masked)."""
    x = load_image(image, cfg)
    hp = _highpass(x, cfg)
    pairs = [(x, masked_views(x, cfg, seed)[view], "normalized"),
             (hp, masked_views(hp, cfg, seed)[view], "high-passed")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharey="row", layout="constrained")
    for row, (a, b, what) in zip(axes, pairs):
        lo, hi = float(a.min()), float(a.max())
        for ax, t, title in ((row[0], a, what), (row[1], b, f"{what} + mask (view {view})")):
            for c, colour in enumerate(("red", "green", "blue")):
                ax.hist(t[0, c].flatten().numpy(), bins=100, range=(lo, hi), histtype="step", color=colour)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("value")
    axes[0, 0].set_ylabel("pixels")
    axes[1, 0].set_ylabel("pixels")
    return _save(fig, Path(out))


def kernels_figure(backbone: nn.Module, out: str | Path, title: str = "") -> Path:
    """The first conv layer's kernels (e.g. 64 x 3 x 7 x 7), each min-max scaled to [0, 1]."""
    conv = getattr(backbone, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or conv.weight.shape[1] != 3:
        raise MscnError("kernels figure: the backbone has no RGB conv1 layer (torchvision ResNet expected)")
    w = conv.weight.detach().float().cpu()
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo + 1e-12)
    cols = 8
    rows = -(-w.shape[0] // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + (0.3 if title else 0)))
    for i, ax in enumerate(axes.flat):
        if i < w.shape[0]:
            ax.imshow(w[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, Path(out))


def all_figures(image: str | Path, cfg: Config, backbone: nn.Module, out_dir: str | Path,
                seed: int = 0, title: str = "") -> list[Path]:
    """views.png, histograms.png and kernels.png in ``out_dir``."""
    out = Path(out_dir)
    return [views_figure(image, cfg, out / "views.png", seed),
            histogram_figure(image, cfg, out / "histograms.png", seed),
            kernels_figure(backbone, out / "kernels.png", title)]
