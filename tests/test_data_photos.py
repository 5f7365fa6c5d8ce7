"""Tests for `mscn data photos`: layout, the train/val tile rule, determinism, errors.

Most tests feed small smooth random "photos" (no optional package needed); the ones
on the real photos skip without scikit-image and scikit-learn (``.[photos]``).
"""
import hashlib
import json
import sys

import numpy as np
import pytest
from PIL import Image

from mscn.data.cli import main
from mscn.data.photos import GRID, PHOTOS, load_photos, make_photos, tile_box
from mscn.errors import DataError


def fake_photos(n=3, h=96, w=128, seed=0):
    """Smooth random colour images (upsampled noise): distinct crops look distinct after JPEG."""
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
            for _ in range(n)]


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def overlap(a, b):
    """Area shared by two (x0, y0, x1, y1) boxes."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def test_layout_and_counts(tmp_path):
    s = make_photos(tmp_path / "p", per_class=6, size=(32, 24), seed=0, val_fraction=0.25,
                    photos=fake_photos(3), progress=False)
    assert (s["num_train"], s["num_val"], s["val_tiles"]) == (18, 6, 4)  # 6 crops per 12 tiles -> 2 per 4
    for split, n in (("train", 6), ("val", 2)):
        classes = sorted(p.name for p in (tmp_path / "p" / split).iterdir())
        assert classes == s["classes"] == ["00_photo0", "01_photo1", "02_photo2"]
        for cls in classes:
            files = sorted((tmp_path / "p" / split / cls).glob("*.jpg"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 24))
    assert json.loads((tmp_path / "p" / "photos.json").read_text())["complete"] is True


def test_train_and_val_crops_come_from_disjoint_tiles(tmp_path):
    photos = fake_photos(2)
    make_photos(tmp_path / "p", per_class=24, size=(32, 32), seed=3, val_fraction=0.3, photos=photos, progress=False)
    meta = json.loads((tmp_path / "p" / "photos.json").read_text())
    h, w = photos[0].shape[:2]
    for c, name in enumerate(meta["classes"]):
        tiles = meta["tiles"][name]
        assert len(tiles["val"]) == round(0.3 * GRID * GRID) == 5
        assert sorted(tiles["train"] + tiles["val"]) == list(range(GRID * GRID))
        boxes = {"train": [], "val": []}
        for rel, crop in meta["crops"].items():
            split, cls, _ = rel.split("/")
            if cls != name:
                continue
            assert crop["tile"] in tiles[split]
            t = tile_box(h, w, crop["tile"])
            b = crop["box"]
            assert t[0] <= b[0] < b[2] <= t[2] and t[1] <= b[1] < b[3] <= t[3], (rel, b, t)
            boxes[split].append(b)
        assert len(boxes["train"]) == 24 and len(boxes["val"]) == round(24 * 5 / 11) == 11  # same crops per tile
        assert {meta["crops"][f"val/{name}/{i:05d}.jpg"]["tile"] for i in range(11)} == set(tiles["val"])
        assert all(overlap(a, b) == 0 for a in boxes["train"] for b in boxes["val"])


def test_recorded_boxes_are_where_the_pixels_come_from(tmp_path):
    photos = fake_photos(1, seed=5)
    make_photos(tmp_path / "p", per_class=12, size=(32, 32), seed=0, photos=photos, progress=False)
    meta = json.loads((tmp_path / "p" / "photos.json").read_text())
    photo = Image.fromarray(photos[0])
    crops = list(meta["crops"].items())
    for rel, crop in crops[:6]:
        written = np.asarray(Image.open(tmp_path / "p" / rel), np.float32)
        errors = []
        for _, other in crops:  # re-cut every recorded box: this file's own box must match best
            x0, y0, _, _ = t = tile_box(*photos[0].shape[:2], other["tile"])
            b = other["box"]
            again = photo.crop(t).resize((32, 32), Image.LANCZOS, box=(b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0))
            errors.append(np.abs(np.asarray(again, np.float32) - written).mean())
        assert min(errors) < 4 and crops[int(np.argmin(errors))][0] == rel


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    kw = dict(per_class=4, size=(24, 24), val_fraction=0.25, photos=fake_photos(2), progress=False)
    make_photos(tmp_path / "a", seed=1, **kw)
    make_photos(tmp_path / "b", seed=1, **kw)
    make_photos(tmp_path / "c", seed=2, **kw)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")
    tiles = [json.loads((tmp_path / d / "photos.json").read_text())["tiles"] for d in "ac"]
    assert tiles[0] != tiles[1]


def test_idempotent_and_refuses_other_parameters(tmp_path):
    kw = dict(per_class=2, size=(24, 24), seed=0, photos=fake_photos(2), progress=False)
    out = tmp_path / "p"
    assert make_photos(out, **kw)["skipped"] is False
    assert make_photos(out, **kw)["skipped"] is True
    with pytest.raises(DataError, match="per_class=2 \\(now 3\\)"):
        make_photos(out, **{**kw, "per_class": 3})
    with pytest.raises(DataError, match="pixels_sha256"):  # other source photos: another dataset
        make_photos(out, **{**kw, "photos": fake_photos(2, seed=9)})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not a photos dataset"):
        make_photos(tmp_path / "other", **kw)


@pytest.mark.parametrize("bad, match", [
    ({"per_class": 0}, "--per-class must be >= 1"),
    ({"seed": -1}, "--seed must be >= 0"),
    ({"size": (8, 64)}, "--size must be at least 16x16"),
    ({"val_fraction": 0.0}, "--val-fraction"),
    ({"val_fraction": 0.02}, "--val-fraction"),  # rounds to 0 of 16 tiles
    ({"val_fraction": 0.97}, "--val-fraction"),  # rounds to 16 of 16: no train tile left
    ({"val_fraction": 1.5}, "--val-fraction"),
])
def test_bad_arguments_are_one_clear_error(tmp_path, bad, match):
    kw = dict(per_class=2, size=(24, 24), seed=0, val_fraction=0.25, photos=fake_photos(1), progress=False)
    with pytest.raises(DataError, match=match):
        make_photos(tmp_path / "p", **{**kw, **bad})
    assert not (tmp_path / "p").exists()  # checked before anything is written


def test_cli_bad_argument_prints_one_line(tmp_path, capsys):
    assert main(["data", "photos", str(tmp_path / "p"), "--val-fraction", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mscn: error: photos: --val-fraction")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage` now raises ImportError
    with pytest.raises(DataError, match=r"pip install 'mscn\[photos\]'"):
        load_photos()


# ----------------------------------------------------------------------------------
# The real photos (the `photos` extra)
# ----------------------------------------------------------------------------------

def test_real_photos_are_distinct_colour_photos():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    photos = load_photos()
    assert len(photos) == len(PHOTOS) == 10
    for p, a in zip(PHOTOS, photos):
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 300, p.name
        assert np.abs(a[..., 0].astype(int) - a[..., 2]).mean() > 5, f"{p.name} looks greyscale"
    means = np.array([a.reshape(-1, 3).mean(0) for a in photos])
    assert len({tuple(np.round(m)) for m in means}) == 10  # no photo twice


def test_cli_on_the_real_photos(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    out = tmp_path / "photos"
    assert main(["data", "photos", str(out), "--per-class", "3", "--size", "32x32", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "30 train + 10 val crops, 10 classes" in printed
    meta = json.loads((out / "photos.json").read_text())
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{c:02d}_{p.name}" for c, p in enumerate(PHOTOS)]
    assert all(s["source"] and s["package"] in ("scikit-image", "scikit-learn") for s in meta["sources"].values())
