"""Tests for the `mscn data` tools: synth, scan, read_file_list, subset and the CLI."""
import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mscn.data.cli import add_data_commands, main
from mscn.data.imagefolder import list_image_folder
from mscn.data.scan import read_file_list, scan
from mscn.data.subset import make_subset
from mscn.data.synth import MAX_CLASSES, class_names, class_spec, synthesize
from mscn.errors import DataError


def _files(root: Path) -> dict:
    """relpath -> (bytes, mtime_ns) for every file under root."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------

def test_synth_is_deterministic_across_worker_counts(tmp_path):
    kw = dict(classes=3, per_class=3, size=(64, 48), val_per_class=1, progress=False)
    a = synthesize(tmp_path / "a", seed=0, workers=1, **kw)
    b = synthesize(tmp_path / "b", seed=0, workers=2, **kw)
    c = synthesize(tmp_path / "c", seed=1, workers=2, **kw)
    fa, fb, fc = (_files(tmp_path / n / s) for n in "abc" for s in ["train"])
    assert a["num_train"] == 9 and a["num_val"] == 3 and not a["skipped"]
    assert sorted({k.split("/")[0] for k in fa}) == class_names(3) == a["classes"]
    assert {k: v[0] for k, v in fa.items()} == {k: v[0] for k, v in fb.items()}
    assert _files(tmp_path / "a" / "val").keys() == _files(tmp_path / "b" / "val").keys()
    assert sum(fa[k][0] != fc[k][0] for k in fa) == len(fa)  # another seed: every image differs
    # val images are drawn from their own seeds, not copies of train images
    val = {v[0] for v in _files(tmp_path / "a" / "val").values()}
    assert not val & {v[0] for v in fa.values()}
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["complete"] is True
    assert b["images_per_s"] > 0 and c["bytes"] > 0


def test_synth_is_idempotent_and_refuses_other_parameters(tmp_path):
    out = tmp_path / "s"
    kw = dict(classes=2, per_class=2, size=(32, 32), progress=False, workers=1)
    synthesize(out, **kw)
    before = _files(out)
    again = synthesize(out, **kw)
    assert again["skipped"] and again["num_train"] == 4 and _files(out) == before
    with pytest.raises(DataError, match=f"{out}.*per_class=2 \\(now 3\\)"):
        synthesize(out, **{**kw, "per_class": 3})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("not ours")
    with pytest.raises(DataError, match=str(foreign)):
        synthesize(foreign, **kw)
    with pytest.raises(DataError, match="classes"):
        synthesize(tmp_path / "t", **{**kw, "classes": MAX_CLASSES + 1})


def test_synth_realistic_resolution_and_jpeg_size(tmp_path):
    s = synthesize(tmp_path / "s", classes=3, per_class=2, seed=0, workers=2, progress=False)
    paths = sorted((tmp_path / "s" / "train").rglob("*.jpg"))
    assert len(paths) == 6
    for p in paths:
        with Image.open(p) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (500, 375))
        # ImageNet's JPEGs at this resolution weigh tens of KB to ~150 KB
        assert 30_000 < p.stat().st_size < 200_000, p
    assert s["kb_min"] * 1024 <= min(p.stat().st_size for p in paths) + 1024


def test_class_specs_are_distinct_up_to_max_classes():
    specs = {class_spec(c) for c in range(MAX_CLASSES)}
    assert len(specs) == MAX_CLASSES
    names = class_names(MAX_CLASSES)
    assert names == sorted(names) and len(set(names)) == MAX_CLASSES
    assert len({class_spec(c)[0] for c in range(10)}) == len({class_spec(c)[1] for c in range(10)}) == 10


def _features(path: Path) -> np.ndarray:
    """Colour-blind features: gradient-orientation histogram + polar FFT energy."""
    g = np.asarray(Image.open(path).convert("L"), np.float32) / 255
    gy, gx = np.gradient(g)
    hist = np.histogram(np.mod(np.arctan2(gy, gx), np.pi), 12, (0, np.pi), weights=np.hypot(gx, gy))[0]
    spec = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean())))
    h, w = g.shape
    y, x = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
    rbin = np.digitize(np.hypot(x / w, y / h), [0.02, 0.05, 0.1, 0.2, 0.35])
    abin = (np.mod(np.arctan2(y, x), np.pi) / np.pi * 12).astype(int) % 12
    polar = np.zeros((6, 12))
    np.add.at(polar, (rbin, abin), spec)
    polar = np.log1p(polar).ravel()
    return np.concatenate([hist / (hist.sum() + 1e-6), polar / polar.sum()])


def _nearest_centroid_accuracy(xtr, ytr, xva, yva, k):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(k)])
    pred = ((xva[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yva).mean())


def test_synth_classes_are_learnable(tmp_path):
    """A nearest-centroid classifier on colour-blind features, trained on the train
    split, must beat chance (0.1) by far on the held-out val split; with shuffled
    training labels the same classifier must not."""
    k = 10
    synthesize(tmp_path / "s", classes=k, per_class=16, val_per_class=8, size=(128, 96), seed=3,
               workers=2, progress=False)
    data = {}
    for split in ("train", "val"):
        _, samples = list_image_folder(tmp_path / "s" / split)
        data[split] = (np.stack([_features(tmp_path / "s" / split / rel) for rel, _ in samples]),
                       np.array([label for _, label in samples]))
    acc = _nearest_centroid_accuracy(*data["train"], *data["val"], k)
    shuffled = np.random.default_rng(0).permutation(data["train"][1])
    control = _nearest_centroid_accuracy(data["train"][0], shuffled, *data["val"], k)
    assert acc >= 0.45, acc
    assert control < 0.3, control


# ----------------------------------------------------------------------------------
# scan and read_file_list
# ----------------------------------------------------------------------------------

def _jpeg(mode="RGB", size=(64, 48), seed=0, fmt="JPEG", **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90, **save)
    return buf.getvalue()


@pytest.fixture
def messy_root(tmp_path):
    """An ImageFolder with one file of every kind scan must tell apart."""
    root = tmp_path / "messy"
    good = _jpeg(seed=1)
    broken = bytearray(_jpeg(seed=2))
    broken[len(broken) // 2:len(broken) // 2 + 300] = b"\xff" * 300  # garbage in the entropy data
    files = {
        "ant/good0.jpg": good, "ant/good1.JPEG": _jpeg(seed=3),
        "ant/corrupt.jpg": bytes(broken), "ant/truncated.jpg": good[: len(good) // 2],
        # a partial download: the second half zeros (PIL decodes it, gray, without an error)
        "ant/zerofilled.jpg": good[: len(good) // 2] + bytes(len(good) - len(good) // 2),
        # valid: data after the image's end (a motion photo's video, a camera trailer)
        "ant/trailer.jpg": good + np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
        "ant/progressive.jpg": _jpeg(seed=8, progressive=True),
        "ant/zero.jpg": b"", "ant/notes.jpg": b"this is text, not a JPEG\n",
        "bee/cmyk.jpg": _jpeg("CMYK", seed=4), "bee/gray.jpg": _jpeg("L", seed=5),
        "bee/sub/image.png": _jpeg(seed=6, fmt="PNG"), "bee/tiny.jpg": _jpeg(size=(16, 40), seed=7),
        "bee/readme.txt": b"ignored by ImageFolder\n",
        # formats under a .jpg name: DALI decodes a BMP, and has no decoder for a GIF
        "bee/bitmap.jpg": _jpeg(seed=9, fmt="BMP"), "bee/anim.jpg": _jpeg(seed=10, fmt="GIF"),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_scan_reports_every_bad_kind_and_lists_only_usable_images(messy_root, tmp_path):
    before = _files(messy_root)
    out, rep = tmp_path / "o" / "list.txt", tmp_path / "o" / "report.json"
    report = scan(messy_root, out=out, report=rep, min_size=32, workers=2, progress=False)
    assert _files(messy_root) == before  # the dataset is never modified

    reasons = {(i["path"], i["reason"]) for i in report["issues"]}
    assert reasons == {
        ("ant/corrupt.jpg", "corrupt"), ("ant/truncated.jpg", "truncated"), ("ant/zero.jpg", "zero_byte"),
        ("ant/zerofilled.jpg", "truncated"),
        ("ant/notes.jpg", "non_image"), ("bee/cmyk.jpg", "cmyk"), ("bee/gray.jpg", "grayscale"),
        ("bee/sub/image.png", "non_jpeg"), ("bee/tiny.jpg", "tiny"), ("bee/readme.txt", "ignored"),
        ("bee/bitmap.jpg", "non_jpeg"), ("bee/anim.jpg", "no_dali_decoder"),
    }
    assert report["counts"]["ok"] == 4 and report["classes"] == ["ant", "bee"]
    assert report["num_files"] == 16 and report["num_kept"] == 8 and report["num_excluded"] == 8
    assert report["formats"]["PNG"] == 1
    assert json.loads(rep.read_text()) == report
    assert out.read_text().splitlines() == [
        "ant/good0.jpg 0", "ant/good1.JPEG 0", "ant/progressive.jpg 0", "ant/trailer.jpg 0", "bee/bitmap.jpg 1", "bee/cmyk.jpg 1", "bee/gray.jpg 1", "bee/sub/image.png 1",
    ]
    assert read_file_list(out, messy_root) == [(line.rsplit(" ", 1)[0], int(line[-1]))
                                                 for line in out.read_text().splitlines()]
    with pytest.raises(DataError, match="inside the dataset"):
        scan(messy_root, out=messy_root / "list.txt", progress=False, workers=1)


def test_scan_of_a_folder_without_one_usable_image_writes_the_report_it_names(tmp_path):
    root = tmp_path / "bad"
    (root / "c").mkdir(parents=True)
    (root / "c" / "a.jpg").write_bytes(b"")
    (root / "c" / "b.jpg").write_bytes(b"not a jpeg")
    rep = tmp_path / "report.json"
    with pytest.raises(DataError, match=f"none of its 2 files is a usable image; see the scan report {rep}"):
        scan(root, out=tmp_path / "list.txt", report=rep, progress=False, workers=1)
    assert {i["reason"] for i in json.loads(rep.read_text())["issues"]} == {"zero_byte", "non_image"}
    assert not (tmp_path / "list.txt").exists()


def test_scan_of_a_flat_folder_writes_an_unlabelled_list_the_readers_take(tmp_path, capsys):
    """Most SSL data has no labels: a flat folder was refused ("an ImageFolder is expected"),
    so its corrupt files could only be found hours into pretraining."""
    from mscn.data.source import resolve_source

    root = tmp_path / "unlabelled"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img {i}.jpg")
    (root / "cut.jpg").write_bytes((root / "img 0.jpg").read_bytes()[:200])
    (root / "empty.jpg").write_bytes(b"")
    out = tmp_path / "u.filelist.txt"
    assert main(["data", "scan", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 files, no classes (a flat folder: the list is unlabelled): kept 3, excluded 2" in printed
    assert out.read_text() == "img 0.jpg\nimg 1.jpg\nimg 2.jpg\n"  # bare paths: no label to write
    report = json.loads(out.with_name("u.scan.json").read_text())
    assert report["classes"] == [] and report["empty_classes"] == []
    assert {i["path"]: i["reason"] for i in report["issues"]} == {"cut.jpg": "truncated", "empty.jpg": "zero_byte"}
    src = resolve_source(str(out))
    assert src.kind == "filelist" and not src.labelled and src.files == ("img 0.jpg", "img 1.jpg", "img 2.jpg")
    assert Path(src.root) == root.resolve()
    # a subset keeps a share of each class: a flat folder, or its scan, has none
    for given in (root, out):
        with pytest.raises(DataError, match="without labels|have no labels"):
            make_subset(given, 0.5)


def test_a_file_list_is_checked_by_folder_listings_with_the_answers_of_a_stat(tmp_path, monkeypatch):
    """Each folder is listed once (a stat per entry took ~13 s for ImageNet here, more on a
    network file system); what counts as present stays what a stat says: symlinks followed,
    a broken one, a folder under an image's name, a missing folder and odd spellings."""
    import os

    root = tmp_path / "root"
    (root / "a" / "dir.jpg").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg"):
        (root / "a" / name).write_bytes(b"")
    (root / "a" / "link.jpg").symlink_to(root / "a" / "x.jpg")
    (root / "a" / "broken.jpg").symlink_to(root / "a" / "nothing.jpg")
    os.mkfifo(root / "a" / "fifo.jpg")
    entries = {"a/x.jpg": True, "a/./y.jpg": True, "a/../a/x.jpg": True, "a/link.jpg": True,
               "a/broken.jpg": False, "a/dir.jpg": False, "a/fifo.jpg": False, "a/z.jpg": False, "b/x.jpg": False,
               "a/x.jpg/": False, str(root / "a" / "y.jpg"): True}
    assert all(os.path.isfile(os.path.join(root, e)) is ok for e, ok in entries.items())  # the stat's answers
    lst = tmp_path / "l.txt"
    for entry, ok in entries.items():
        lst.write_text(f"a/x.jpg 0\n{entry} 0\n")
        if ok:
            assert [r for r, _ in read_file_list(lst, root)] == ["a/x.jpg", entry]
        else:  # what stands there, if anything
            what = {"a/broken.jpg": "a dangling symlink, not an image file:", "a/dir.jpg": "a folder, not an image file:",
                    "a/fifo.jpg": re.escape("not a regular file (a FIFO, a socket or a device):")}.get(entry,
                                                                                                  "missing file")
            with pytest.raises(DataError, match=f"l.txt:2: {what} {re.escape(str(root / entry))}"):
                read_file_list(lst, root)
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: listed.append(p) or real(p))
    monkeypatch.setattr(os.path, "isfile", None)  # a look per present entry would fail here
    lst.write_text("".join(f"a/{n}.jpg 0\n" for n in ("x", "y", "link", "x", "y")))
    assert len(read_file_list(lst, root)) == 5 and listed == [os.path.join(root, "a")]


def test_read_file_list_errors_name_the_list_line_and_file(tmp_path, messy_root):
    with pytest.raises(DataError, match="nope.txt: file list not found"):
        read_file_list(tmp_path / "nope.txt", messy_root)
    bad = tmp_path / "bad.txt"
    bad.write_text("ant/good0.jpg 0\nant/good1.JPEG\n")
    with pytest.raises(DataError, match="bad.txt:2: expected"):
        read_file_list(bad, messy_root)
    gone = tmp_path / "gone.txt"
    gone.write_text("ant/good0.jpg 0\nant/lost.jpg 0\nbee/lost2.jpg 1\nbee/lost3.jpg 1\n")
    with pytest.raises(DataError, match=r"gone.txt:2: missing file .*ant/lost.jpg and 2 more of 4 .*lost2"):
        read_file_list(gone, messy_root)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty file list"):
        read_file_list(empty, messy_root)


def test_missing_or_empty_roots_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'absent'}: no such directory"):
        scan(tmp_path / "absent", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: empty folder"):
        make_subset(tmp_path / "empty", 0.5)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path / 'noimg'}: no images"):
        list_image_folder(tmp_path / "noimg")
    (tmp_path / "ds" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="pass .*ds/train instead"):
        list_image_folder(tmp_path / "ds")
    # files but no class folders: what they are (shards have their own reader), not "empty"
    (tmp_path / "shards").mkdir()
    for name in ("a-000.tar", "a-000.idx", "a-001.tar"):
        (tmp_path / "shards" / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"shards: no class sub-folders but 2 .tar shard\(s\): a webdataset folder"):
        scan(tmp_path / "shards", progress=False)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"flat: no class sub-folders but 1 file\(s\) directly in it, e.g. x.jpg"):
        list_image_folder(tmp_path / "flat")
    # the scan takes a flat folder (unlabelled data) and says what is wrong with its files
    with pytest.raises(DataError, match=r"flat: none of its 1 files is a usable image"):
        scan(tmp_path / "flat", progress=False)



def test_a_folder_of_both_shapes_is_refused_and_a_macos_zip_folder_is_no_class(tmp_path):
    """Images at the top beside sub-folders: as an ImageFolder the top's images were left
    out without a word (a flat set with a thumbs/ folder trained on the thumbnails only).
    __MACOSX/ (resource forks from a macOS zip) made a flat folder an ImageFolder with no
    images, and an ImageFolder's first class, shifting every label."""
    from mscn.data.source import resolve_source

    mixed = tmp_path / "mixed"
    (mixed / "thumbs").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "thumbs/t.jpg"):
        (mixed / name).write_bytes(_jpeg())
    for call in (lambda: resolve_source(str(mixed)), lambda: scan(mixed, progress=False)):
        with pytest.raises(DataError, match=r"mixed: 2 image\(s\) directly in it \(e.g. a.jpg\) and 1 sub-folder"):
            call()
    flat = tmp_path / "flat_mac"
    (flat / "__MACOSX").mkdir(parents=True)
    (flat / "__MACOSX" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    (flat / "a.jpg").write_bytes(_jpeg())
    src = resolve_source(str(flat))
    assert src.files == ("a.jpg",) and not src.labelled
    folder = tmp_path / "folder_mac"
    for name in ("__MACOSX/cat/._x.jpg", "cat/x.jpg", "dog/y.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg())
    src = resolve_source(str(folder))
    assert src.classes == ("cat", "dog") and src.files == ("cat/x.jpg", "dog/y.jpg") and src.labels == (0, 1)


# ----------------------------------------------------------------------------------
# subset
# ----------------------------------------------------------------------------------

@pytest.fixture
def imagenet_like(tmp_path):
    """Empty .JPEG files named like ImageNet's (subset never decodes)."""
    root = tmp_path / "train"
    for wnid, n in (("n01440764", 50), ("n01443537", 10), ("n01484850", 3)):
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            (root / wnid / f"{wnid}_{1000 + i}.JPEG").write_bytes(b"")
    return root


def test_subset_is_balanced_deterministic_and_sorted(imagenet_like, tmp_path):
    _, full = list_image_folder(imagenet_like)
    sub = make_subset(imagenet_like, 0.1, seed=0, out=tmp_path / "s.txt")
    per_class = np.bincount([label for _, label in sub], minlength=3)
    assert per_class.tolist() == [5, 1, 1]  # round(0.1 * n), but at least one image
    assert sub == sorted(sub) and set(sub) <= set(full) and len(set(sub)) == len(sub)
    assert make_subset(imagenet_like, 0.1, seed=0) == sub
    assert make_subset(imagenet_like, 0.1, seed=1) != sub
    assert read_file_list(tmp_path / "s.txt", imagenet_like) == sub
    assert len(make_subset(imagenet_like, 1.0)) == len(full)
    for bad in (0.0, 1.5):
        with pytest.raises(DataError, match="fraction"):
            make_subset(imagenet_like, bad)


def test_subset_converts_official_file_and_reports_unmatched(imagenet_like, tmp_path, capsys):
    official = tmp_path / "1percent.txt"
    official.write_text("n01440764_1007.JPEG\nn01484850_1002.JPEG\nn09999999_1.JPEG\n\n")
    sub = make_subset(imagenet_like, None, official=official)
    assert sub == [("n01440764/n01440764_1007.JPEG", 0), ("n01484850/n01484850_1002.JPEG", 2)]
    assert "1 of 3 names" in capsys.readouterr().err
    official.write_text("n09999999_1.JPEG\n")
    with pytest.raises(DataError, match="none of its 1 names"):
        make_subset(imagenet_like, None, official=official)


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["synth"], ["photos"], ["scan"], ["subset"], ["pack"]])
def test_cli_help(command, capsys):
    parser = argparse.ArgumentParser(prog="mscn")
    add_data_commands(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["data", *command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: mscn data {' '.join(command)}".strip() in capsys.readouterr().out


def test_cli_runs_commands_and_prints_one_line_errors(imagenet_like, messy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs land in the working directory
    assert main(["data", "scan", str(messy_root), "--workers", "1"]) == 0
    assert (tmp_path / "messy.filelist.txt").is_file() and (tmp_path / "messy.scan.json").is_file()
    # the excluded files are named on the terminal too (they were only in the JSON report)
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "messy.scan.json").read_text())
    for issue in (i for i in report["issues"] if i["excluded"]):
        assert f"scan: excluded {messy_root / issue['path']}: {issue['reason']}" in out, issue
    assert f"{messy_root / 'bee/cmyk.jpg'}" not in out  # kept files are not listed as excluded
    assert report["empty_classes"] == [] and "holds no usable image" not in out
    (messy_root / "cat").mkdir()  # an empty class folder takes a label without a word (torchvision refuses it)
    assert main(["data", "scan", str(messy_root), "--workers", "1"]) == 0
    assert f"scan: note: class folder {messy_root / 'cat'} holds no usable image; it still takes a label" in \
        capsys.readouterr().out
    (messy_root / "cat").rmdir()
    assert main(["data", "subset", str(imagenet_like), "--fraction", "0.2", "--seed", "4"]) == 0
    (written,) = tmp_path.glob("*_train.subset20pct.seed4.txt")  # split folders get their parent's name
    assert len(written.read_text().splitlines()) == 10 + 2 + 1
    assert main(["data", "synth", str(tmp_path / "syn"), "--classes", "2", "--per-class", "1",
                 "--size", "40x30", "--workers", "1"]) == 0
    assert main(["data", "scan", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mscn: error: ") and str(tmp_path / "missing") in err
    with pytest.raises(SystemExit):
        main(["data", "synth", "x", "--classes", "2", "--per-class", "1", "--size", "big"])
    # sizes JPEG or memory cannot hold, and a negative process count: refused before any work
    for argv, why in ((["synth", "x", "--size", "70000x16"], "each side must be 1..8192 px"),
                      (["photos", "x", "--size", "100000x100000"], "each side must be 1..8192 px"),
                      (["scan", "x", "--workers", "-2"], "must be >= 1, got -2")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["data", *argv])
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_scan_replaces_its_own_outputs_but_no_other_file(messy_root, tmp_path):
    out, rep = tmp_path / "list.txt", tmp_path / "list.scan.json"
    scan(messy_root, out=out, report=rep, progress=False, workers=1)
    scan(messy_root, out=out, report=rep, progress=False, workers=1)  # a rescan updates them
    mine = tmp_path / "mine.txt"
    mine.write_text("my own notes\n")
    with pytest.raises(DataError, match=r"mine.txt: a file is already there that this scan did not write"):
        scan(messy_root, out=mine, report=tmp_path / "mine.scan.json", progress=False, workers=1)
    assert mine.read_text() == "my own notes\n" and not (tmp_path / "mine.scan.json").exists()


def test_a_list_without_its_report_says_where_its_paths_were_looked_for(messy_root, tmp_path, capsys):
    """A list the readers cannot place (its scan report written elsewhere with --report, or a
    text file that is no file list): the error says the root was guessed and why, not only
    "rescan"; scan itself warns when --report is not where the readers will look."""
    from mscn.cli import main
    from mscn.data.source import resolve_source

    lists = tmp_path / "lists"
    assert main(["data", "scan", str(messy_root), "--workers", "1", "--out", str(lists / "x.txt"),
                 "--report", str(tmp_path / "elsewhere.json")]) == 0
    out = capsys.readouterr().out
    assert f"its report must be beside it as {lists / 'x.scan.json'}" in out
    with pytest.raises(DataError) as e:
        resolve_source(str(lists / "x.txt"))
    assert "x.txt:1: missing file" in str(e.value) and "no scan report beside the list (x.scan.json)" in str(e.value)
    (lists / "x.scan.json").write_text((tmp_path / "elsewhere.json").read_text())  # as the note says
    assert resolve_source(str(lists / "x.txt")).num_samples > 0
    assert main(["data", "scan", str(messy_root), "--workers", "1", "--out", str(lists / "y.txt")]) == 0
    assert "note:" not in capsys.readouterr().out  # the default report is beside the list


def test_links_loops_and_fifos_in_an_image_folder_are_listed_once_and_never_read(tmp_path):
    """A symlink back up the tree (b/up -> ..) neither loops nor lists class a's images under
    b; a FIFO named .jpg (which would block a reader forever) and a dangling link are not
    files to read; a class folder linked in from elsewhere is followed."""
    import os

    root = tmp_path / "ds"
    for rel in ("a/0.jpg", "b/0.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg())
    (root / "b" / "up").symlink_to("..")
    (root / "b" / "self").symlink_to(".")
    (root / "b" / "dead.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(root / "b" / "pipe.jpg")
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep" / "1.jpg").write_bytes(_jpeg(seed=1))
    (root / "c").symlink_to(tmp_path / "elsewhere")
    classes, samples = list_image_folder(root)
    assert classes == ["a", "b", "c"]
    assert samples == [("a/0.jpg", 0), ("b/0.jpg", 1), ("c/deep/1.jpg", 2)]
    report = scan(root, out=tmp_path / "list.txt", report=tmp_path / "r.json", progress=False, workers=1)
    assert report["num_kept"] == 3
    # a class folder that is a link to a sibling class: its images were listed twice, under two labels
    (root / "d").symlink_to("a")
    with pytest.raises(DataError, match=r"ds/d: a link to the class folder 'a' of the same dataset"):
        list_image_folder(root)


def test_subset_replaces_an_earlier_list_but_no_other_file(imagenet_like, tmp_path):
    out = tmp_path / "sub.txt"
    make_subset(imagenet_like, 0.5, out=out)
    chosen = make_subset(imagenet_like, 0.25, out=out)  # an earlier list: replaced
    assert out.read_text() == "".join(f"{rel} {label}\n" for rel, label in chosen)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    with pytest.raises(DataError, match=r"notes.txt: a file is already there that is not a file list"):
        make_subset(imagenet_like, 0.5, out=notes)
    assert notes.read_text() == "precious\n"


def test_file_lists_and_reports_that_are_not_what_they_seem_are_one_line(messy_root, tmp_path):
    from mscn.data.source import resolve_source

    lst = tmp_path / "l.txt"
    lst.write_bytes("ant/good0.jpg 0\nant/caf\xe9.jpg 0\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(DataError, match=r"l.txt: not a UTF-8 text file"):
        read_file_list(lst, messy_root)
    lst.write_text("\ufeffant/good0.jpg 0\nbee/gray.jpg 1\n", encoding="utf-8")  # a BOM: read past it
    assert read_file_list(lst, messy_root) == [("ant/good0.jpg", 0), ("bee/gray.jpg", 1)]
    lst.write_text("ant/good0.jpg 0\nbee/gray.jpg \u00b2\n")  # a superscript two: isdigit, not a label
    with pytest.raises(DataError, match=r"l.txt:2: expected 'relative/path label' like line 1"):
        read_file_list(lst, messy_root)
    # lists written by other tools: what is wrong is said, not only "missing file"
    lst.write_text("ant/good0.jpg 0\nbee/gray.jpg -1\n")
    with pytest.raises(DataError, match=r"l.txt:2: .* \(a label is a class number, an integer >= 0\), got "
                                        r"'bee/gray.jpg -1'"):
        read_file_list(lst, messy_root)
    lst.write_text("ant/good0.jpg ant\nbee/gray.jpg bee\n")  # labels as names: read as bare paths with spaces
    with pytest.raises(DataError, match=r"l.txt:1: missing file .*ant/good0.jpg ant and 1 more .*; it reads as the "
                                        r"file ant/good0.jpg with the label 'ant', which is not a class number"):
        read_file_list(lst, messy_root)
    lst.write_text("# my training images\nant/good0.jpg 0\n")
    with pytest.raises(DataError, match=r"l.txt:1: missing file .*; a file list has no comment lines: delete it"):
        read_file_list(lst, messy_root)
    lst.write_text("ant/good0.jpg 0\n")
    for junk in ('{"root": null}', "[1, 2]"):
        (tmp_path / "l.scan.json").write_text(junk)
        with pytest.raises(DataError, match=r"l.scan.json: not a scan report with a 'root' entry"):
            resolve_source(str(lst))


def test_names_a_list_cannot_hold_a_moved_dataset_and_a_folder_read_as_shards(messy_root, tmp_path):
    import shutil

    from mscn.data.source import resolve_source

    (messy_root / "ant" / "two\nlines.jpg").write_bytes(_jpeg(seed=11))
    out, rep = tmp_path / "l.txt", tmp_path / "l.scan.json"
    report = scan(messy_root, out=out, report=rep, progress=False, workers=1)
    assert ("ant/two\nlines.jpg", "bad_name") in {(i["path"], i["reason"]) for i in report["issues"]}
    assert len(read_file_list(out, messy_root)) == report["num_kept"]  # every line one file
    shutil.move(messy_root, tmp_path / "moved")
    with pytest.raises(DataError, match=r"messy: no such directory \(the root the file list .*l.txt is relative to, "
                                        r"from its scan report l.scan.json or as given\); if the dataset moved"):
        resolve_source(str(out))
    with pytest.raises(DataError, match=r"moved: an image folder, not .tar shards \(data.format=wds\)"):
        resolve_source(str(tmp_path / "moved"), "wds")


def test_a_stopped_pack_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    """A pack stopped part-way (hours into ImageNet) refused every rerun ("already holds .tar
    shards") while the readers said to rerun it. The same command now keeps the whole shards
    and the decode check, and the result is byte for byte an uninterrupted pack's."""
    import filecmp

    import mscn.data.pack as pk
    from pipeline_fixtures import make_folder

    root = make_folder(tmp_path / "ds", classes=2, per_class=10)
    (root / "c0" / "bad.jpg").write_bytes(b"not a jpeg")
    real_add, seen = pk._add, []

    def stop_at_13th_image(tar, name, data):
        if name.endswith(".jpg"):
            seen.append(name)
            if len(seen) == 13:
                raise KeyboardInterrupt
        real_add(tar, name, data)

    monkeypatch.setattr(pk, "_add", stop_at_13th_image)
    with pytest.raises(KeyboardInterrupt):
        pk.pack(root, tmp_path / "out", shard_size=5, progress=False, workers=1)
    monkeypatch.setattr(pk, "_add", real_add)
    assert (tmp_path / "out" / ".packing").is_file() and (tmp_path / "out" / "shard-000002.tar.tmp").is_file()
    with pytest.raises(DataError, match=r"an unfinished pack of another --shard-size .*rerun that command"):
        pk.pack(root, tmp_path / "out", shard_size=4, progress=False, workers=1)

    def no_second_check(*_a, **_k):
        raise AssertionError("the decode check ran again")

    monkeypatch.setattr(pk, "undecodable", no_second_check)
    assert main(["data", "pack", str(root), str(tmp_path / "out"), "--shard-size", "5", "--workers", "1"]) == 0
    assert "went on from an unfinished pack in" in capsys.readouterr().out
    monkeypatch.undo()
    pk.pack(root, tmp_path / "ref", shard_size=5, progress=False, workers=1)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())  # no .packing, no .tmp left
    assert all(filecmp.cmp(tmp_path / "out" / n, tmp_path / "ref" / n, shallow=False) for n in names)
    # a marker of an mscn that kept no plan: its shards go, the pack starts over
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "shard-000000.tar").write_bytes(b"half")
    (tmp_path / "old" / ".packing").write_text("mscn data pack ds old: started 2026-11-20\n")
    pk.pack(root, tmp_path / "old", shard_size=5, progress=False, workers=1)
    assert filecmp.cmp(tmp_path / "old" / "shard-000000.tar", tmp_path / "ref" / "shard-000000.tar", shallow=False)
    # a file as OUT: refused before the decode check
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(pk, "undecodable", no_second_check)
    with pytest.raises(DataError, match=r"afile: a file; pack takes a folder"):
        pk.pack(root, tmp_path / "afile", shard_size=5, progress=False, workers=1)


def test_a_full_disk_during_a_pack_is_one_line_and_the_rerun_goes_on(tmp_path, monkeypatch):
    import errno

    import mscn.data.pack as pk
    from pipeline_fixtures import make_folder

    root = make_folder(tmp_path / "ds", classes=1, per_class=10)
    real_add, n = pk._add, []

    def full_after_7(tar, name, data):
        n.append(name)
        if len(n) > 7 * 3:  # .jpg, .cls, .idx per sample
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(tar, name, data)

    monkeypatch.setattr(pk, "_add", full_after_7)
    with pytest.raises(DataError, match=r"shard-000001.tar: cannot write the shard \(No space left on device\); "
                                        r"1 of 2 shards are written: free space, then rerun the same command"):
        pk.pack(root, tmp_path / "out", shard_size=5, progress=False, workers=1)
    assert not list((tmp_path / "out").glob("*.tmp"))
    monkeypatch.setattr(pk, "_add", real_add)
    assert pk.pack(root, tmp_path / "out", shard_size=5, progress=False, workers=1)["resumed_shards"] == 1


def test_worker_pools_follow_the_cpu_affinity():
    """The default --workers was os.cpu_count(): a 4-core slice (taskset, SLURM) of a 128-core
    node started 128 processes. It is the cores this process may use."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and 2 usable cores")
    code = ("import os\nfrom mscn.data.imagefolder import parallel_imap\n"
            "def pid(_):\n    return os.getpid()\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "print(set(parallel_imap(pid, list(range(8)), None, 'x', progress=False)) == {os.getpid()})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr  # one usable core: one worker, this process


def test_scan_outputs_are_checked_before_the_decode_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    import mscn.data.scan as sc
    import mscn.paths as paths
    from pipeline_fixtures import make_folder

    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    (tmp_path / "folder").mkdir()

    def no_decode(*_a, **_k):
        raise AssertionError("decoded before the outputs were checked")

    monkeypatch.setattr(sc, "parallel_imap", no_decode)
    with pytest.raises(DataError, match=r"--out .*folder: a folder; it takes the file to write"):
        scan(root, out=tmp_path / "folder", report=tmp_path / "r.json")
    with pytest.raises(DataError, match=r"--min-size -5: must be >= 0"):
        scan(root, out=tmp_path / "l.txt", report=tmp_path / "r.json", min_size=-5)
    monkeypatch.undo()

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paths.os, "replace", full)  # the shared writer scan writes through
    with pytest.raises(DataError, match=r"l.scan.json: cannot write it \(No space left on device\)"):
        scan(root, out=tmp_path / "l.txt", report=tmp_path / "l.scan.json", workers=1, progress=False)
    assert not list(tmp_path.glob("*.tmp"))  # no empty temporary left beside


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_during_a_pool_is_one_line(tmp_path, sig):
    """kill (SIGTERM) ended scan/pack at once and their workers printed BrokenPipeError
    tracebacks; Ctrl-C sometimes printed the workers' KeyboardInterrupt tracebacks. The main
    process now stops the pool and says it in one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\nfrom mscn.data.imagefolder import parallel_imap\nfrom mscn.errors import run_cli\n"
            "def slow(x):\n    time.sleep(0.2)\n    return x\n"
            "def body():\n    print('started', flush=True)\n"
            "    for _ in parallel_imap(slow, list(range(200)), 2, 'scan /data/x', progress=False):\n        pass\n"
            "sys.exit(run_cli(body, 'mscn'))\n")
    # SIGINT as a terminal sends it: to the whole process group, workers included
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.0)
        if sig == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)  # the workers' last words, if any, are on the same stderr
    assert "Traceback" not in err, err
    if sig == "SIGTERM":
        assert proc.returncode == 143 and err.strip() == ("mscn: stopped by SIGTERM during scan /data/x; what it had "
                                                          "done is not written: rerun the same command"), err
    else:
        assert proc.returncode == 130 and err.strip() == "mscn: interrupted", err


def test_a_second_pack_into_a_folder_being_packed_is_refused(tmp_path):
    """Two packs into one folder both exited 0, the second's shards over the first's."""
    import subprocess
    import sys

    from pipeline_fixtures import make_folder

    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\nfrom pathlib import Path\nfrom mscn.data.pack import _pack_lock\n"
        f"with _pack_lock(Path({str(out)!r})):\n    print('held', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=r"out: another mscn data pack is writing there now \(pid \d+\)"):
            from mscn.data.pack import pack
            pack(root, out, shard_size=5, progress=False, workers=1)
    finally:
        holder.kill()
        holder.wait()
    pack(root, out, shard_size=5, progress=False, workers=1)  # the lock went with its process
    assert (out / "sources.json").is_file() and not (out / ".packing").exists()
    bad = tmp_path / "bad" / "c0"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="none of its 1 files decodes"):  # refused after the lock was taken
        pack(bad.parent, tmp_path / "new", shard_size=5, progress=False, workers=1)
    assert not (tmp_path / "new").exists()  # no empty folder left behind


def test_a_subset_of_a_scan_list_draws_only_what_the_scan_kept(messy_root, tmp_path, monkeypatch):
    """A subset of the scanned folder could draw a file the scan excluded (the fine-tuning
    loader then stops on it); a subset of the scan's list cannot."""
    from mscn.train.eval.finetune import read_subset

    report = scan(messy_root, out=tmp_path / "m.filelist.txt", report=tmp_path / "m.scan.json",
                  progress=False, workers=1)
    excluded = {i["path"] for i in report["issues"] if i["excluded"]}
    everything = make_subset(messy_root, 1.0)
    assert excluded & {rel for rel, _ in everything}  # the folder's draw takes them
    kept = make_subset(tmp_path / "m.filelist.txt", 1.0, out=tmp_path / "sub.txt")
    assert not excluded & {rel for rel, _ in kept} and len(kept) == report["num_kept"]
    assert read_subset(tmp_path / "sub.txt", messy_root) == kept  # relative to the images' folder
    monkeypatch.chdir(tmp_path)
    assert main(["data", "subset", str(tmp_path / "m.filelist.txt"), "--fraction", "0.5"]) == 0
    assert (tmp_path / "m.subset50pct.seed0.txt").is_file()
    (tmp_path / "m.scan.json").unlink()  # no report: no root, no classes
    with pytest.raises(DataError, match=r"m.filelist.txt: a subset is drawn from an ImageFolder, or from a file list"):
        make_subset(tmp_path / "m.filelist.txt", 0.5)


def test_a_pack_of_a_scan_list_decodes_only_what_changed_since_the_scan(tmp_path, monkeypatch, capsys):
    """ImageNet's 1.28 M files were decoded twice, by the scan and again by the pack of its
    list. The pack now trusts the files the scan kept and nobody touched since; a file
    changed after the scan, or one the scan excluded and a hand-edited list names again, is
    decoded and skipped as before."""
    import time

    import mscn.data.pack as pk
    from mscn.data.pack import pack
    from pipeline_fixtures import make_folder

    root = make_folder(tmp_path / "ds", classes=2, per_class=6)
    (root / "c1" / "bad.jpg").write_bytes(b"not a jpeg")  # excluded by the scan
    monkeypatch.setattr(pk, "TIME_SLACK_S", 0.0)  # no coarse clock here: no need to wait 2 s
    time.sleep(0.05)
    listed = tmp_path / "ds.filelist.txt"
    scan(root, out=listed, report=tmp_path / "ds.scan.json", progress=False, workers=1)
    time.sleep(0.05)
    (root / "c0" / "003.jpg").write_bytes((root / "c0" / "003.jpg").read_bytes()[:150])  # cut short after the scan
    with open(listed, "a") as f:
        f.write("c1/bad.jpg 1\n")  # named again by hand
    checked = []
    real = pk._decode_task
    monkeypatch.setattr(pk, "_decode_task", lambda path: checked.append(Path(path).name) or real(path))
    capsys.readouterr()
    summary = pack(listed, tmp_path / "shards", progress=True, workers=1)
    assert sorted(checked) == ["003.jpg", "bad.jpg"]
    assert set(summary["skipped"]) == {"c0/003.jpg", "c1/bad.jpg"}
    assert "11 of 13 files were decoded by the scan that wrote" in capsys.readouterr().out
    # without the report's time (a scan from before it), every file is decoded, as before
    report = json.loads((tmp_path / "ds.scan.json").read_text())
    del report["scanned_at"]
    (tmp_path / "ds.scan.json").write_text(json.dumps(report))
    checked.clear()
    pack(listed, tmp_path / "shards2", progress=False, workers=1)
    assert len(checked) == 13


def test_a_file_the_scan_cannot_read_is_excluded_not_fatal(tmp_path, monkeypatch):
    """A file without read permission (or an I/O error) stopped the whole scan with
    "cannot use ...: Permission denied"; it is one excluded line of the report now."""
    import builtins

    import mscn.data.scan as scan_module

    for name in ("cat/a.jpg", "cat/b.jpg", "dog/c.jpg"):
        (tmp_path / "ds" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ds" / name).write_bytes(_jpeg())

    def no_read(path, *a, **k):  # as root, chmod 000 reads all the same: refuse this one here
        if str(path).endswith("b.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(scan_module, "open", no_read, raising=False)
    rep = scan(tmp_path / "ds", out=tmp_path / "l.txt", workers=1, progress=False)
    assert rep["counts"]["unreadable"] == 1 and rep["counts"]["ok"] == 2
    assert (tmp_path / "l.txt").read_text().split() == ["cat/a.jpg", "0", "dog/c.jpg", "1"]


def test_a_panorama_above_pils_bomb_limit_is_kept_not_called_corrupt(tmp_path):
    """PIL refuses to open an image above 2 x MAX_IMAGE_PIXELS (179 MP): the scan excluded a
    valid 180 MP panorama as "corrupt" (DALI decodes it). A JPEG whose header says
    20000x10000 (200 MP) is kept now, with a note that only its header was read."""
    from PIL import Image as PILImage

    data = bytearray(_jpeg(size=(16, 8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (10000).to_bytes(2, "big") + (20000).to_bytes(2, "big")  # height, width
    (tmp_path / "ds" / "pano").mkdir(parents=True)
    (tmp_path / "ds" / "pano" / "p.jpg").write_bytes(bytes(data))
    with pytest.raises(PILImage.DecompressionBombError):
        PILImage.open(tmp_path / "ds" / "pano" / "p.jpg")
    rep = scan(tmp_path / "ds", out=tmp_path / "l.txt", workers=1, progress=False)
    assert rep["counts"]["huge"] == 1 and rep["counts"]["corrupt"] == 0
    assert (tmp_path / "l.txt").read_text().split() == ["pano/p.jpg", "0"]
    assert PILImage.MAX_IMAGE_PIXELS == 89478485  # PIL's limit is back as it was


def test_links_that_loop_or_lead_into_another_class_are_not_read(tmp_path):
    """A symlink loop raised "Too many levels of symbolic links" out of scan, pretrain and
    eval; a file linked in from another class was listed under both labels."""
    import os

    from mscn.data.source import resolve_source

    root = tmp_path / "ds"
    for rel in ("c0/a.jpg", "c0/b.jpg", "c1/c.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg(seed=len(rel)))
    os.symlink("loop.jpg", root / "c1" / "loop.jpg")  # a link to itself
    os.symlink("../c0/a.jpg", root / "c1" / "also_a.jpg")  # another class's image
    os.symlink("y", root / "x")  # two links to each other at the root
    os.symlink("x", root / "y")
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(_jpeg(seed=9))
    os.symlink(outside, root / "c1" / "linked_in.jpg")  # from other storage: read
    want = [("c0/a.jpg", 0), ("c0/b.jpg", 0), ("c1/c.jpg", 1), ("c1/linked_in.jpg", 1)]
    assert list_image_folder(root)[1] == want
    assert list(zip(resolve_source(str(root)).files, resolve_source(str(root)).labels)) == want
    report = scan(root, out=tmp_path / "l.txt", report=tmp_path / "l.scan.json", workers=1, progress=False)
    assert report["num_kept"] == 4
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(_jpeg(seed=1))
    os.symlink("self.jpg", flat / "self.jpg")
    assert resolve_source(str(flat)).files == ("a.jpg",)


def test_a_name_that_is_not_utf8_is_named_and_left_out_by_the_scan(tmp_path):
    """A Latin-1 name (b'caf\\xe9.jpg'): the scan stopped in a UnicodeEncodeError writing its
    list, and training in DALI's "Unsupported argument type with name files"."""
    import os

    from mscn.data.source import resolve_source

    root = tmp_path / "ds"
    (root / "c0").mkdir(parents=True)
    (root / "c0" / "ok.jpg").write_bytes(_jpeg(seed=1))
    with open(os.fsencode(root / "c0") + b"/caf\xe9.jpg", "wb") as f:
        f.write(_jpeg(seed=2))
    with pytest.raises(DataError, match=r"ds/c0/caf\\xe9.jpg: a file name that is not valid UTF-8, which DALI's "
                                        r"reader and file lists cannot take; rename it"):
        resolve_source(str(root))
    report = scan(root, out=tmp_path / "l.txt", report=tmp_path / "l.scan.json", workers=1, progress=False)
    assert report["num_kept"] == 1 and report["counts"]["bad_name"] == 1
    assert (tmp_path / "l.txt").read_text() == "c0/ok.jpg 0\n"


def test_a_worker_that_dies_stops_the_pool_in_one_line():
    """A pool worker killed (the out-of-memory killer): Pool replaced it and scan/pack waited
    for its tasks forever."""
    import subprocess
    import sys

    code = ("import os, signal, sys, time\nfrom mscn.data.imagefolder import parallel_imap\n"
            "from mscn.errors import run_cli\n"
            "def work(x):\n    time.sleep(0.02)\n    return os.getpid()\n"
            "def body():\n    for i, pid in enumerate(parallel_imap(work, list(range(400)), 2, 'scan /data/x', "
            "progress=False)):\n        if i == 20:\n            os.kill(pid, signal.SIGKILL)\n    print('finished')\n"
            "sys.exit(run_cli(body, 'mscn'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip().startswith("mscn: error: scan /data/x: a worker process died"), proc.stderr


def test_scan_keeps_a_png_with_a_large_text_chunk(tmp_path):
    """PIL refuses a zTXt chunk that inflates past 1 MiB ("Decompressed data too large"): the
    scan called the PNG corrupt and left it out, though DALI decodes it."""
    from PIL import PngImagePlugin

    from mscn.data.scan import check_image

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x" * 2**21, zip=True)
    path = tmp_path / "prompt.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path, pnginfo=info)
    assert check_image(str(path), 0) == ([("non_jpeg", "PNG (DALI decodes it on the CPU)")], "PNG")
    assert PngImagePlugin.MAX_TEXT_CHUNK == 2**20  # PIL's own limit, put back


def test_a_scans_list_keeps_to_its_report_and_a_subset_does_not_replace_it(tmp_path):
    """A label past the report's classes (a line edited by hand) scored as a class of its own
    in kNN; `data subset --out` onto the scan's own list replaced the whole set's list with a
    1 % one, the report beside it still counting the whole set. A flat folder's name that
    starts with a space is read back as written."""
    from mscn.data.source import resolve_source

    root = tmp_path / "ds"
    for rel in ("c0/a.jpg", "c0/b.jpg", "c1/c.jpg", "c1/d.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg(seed=len(rel)))
    listed = tmp_path / "l.txt"
    scan(root, out=listed, report=tmp_path / "l.scan.json", workers=1, progress=False)
    whole = listed.read_text()
    with pytest.raises(DataError, match=r"--out .*l.txt: the file list `mscn data scan` wrote"):
        make_subset(listed, 0.5, out=listed)
    assert listed.read_text() == whole
    listed.write_text(whole.replace("c0/a.jpg 0", "c0/a.jpg 7"))
    with pytest.raises(DataError, match=r"l.txt: label 7 \(c0/a.jpg\) is outside the 2 classes its scan report "
                                        r"names \(0-1\)"):
        resolve_source(str(listed))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / " space first.jpg").write_bytes(_jpeg(seed=1))
    (flat / "b.jpg").write_bytes(_jpeg(seed=2))
    scan(flat, out=tmp_path / "f.txt", report=tmp_path / "f.scan.json", workers=1, progress=False)
    assert resolve_source(str(tmp_path / "f.txt")).files == (" space first.jpg", "b.jpg")
