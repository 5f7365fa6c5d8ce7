"""Data sources and bad input: file lists, tar shards (pack round trip), odd images, errors."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_fixtures import bad_huffman_jpeg, make_folder, make_image, tiny_cfg

from mscn.data.pack import pack
from mscn.data.shardindex import write_dali_index
from mscn.errors import DataError
from mscn.pipelines import build_eval_loader, build_train_loader, resolve_source


def eval_samples(cfg, root, **kw) -> dict[int, tuple[int, torch.Tensor]]:
    out = {}
    for b in build_eval_loader(cfg, str(root), batch_size=7, **kw):
        for v, y, i in zip(b.views[0], b.labels.tolist(), b.index.tolist()):
            out[i] = (y, v)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=9)


@pytest.mark.parametrize("shuffle_seed", [0, None])
def test_pack_round_trip_gives_the_file_readers_samples(folder, tmp_path, shuffle_seed):
    """Same (label, decoded pixels) per index from the tar shards as from the folder."""
    summary = pack(folder, tmp_path / "wds", shard_size=10, shuffle_seed=shuffle_seed, progress=False)
    assert summary["num_samples"] == 27 and summary["num_shards"] == 3
    src = resolve_source(str(tmp_path / "wds"))
    assert src.kind == "wds" and src.num_samples == 27 and src.has_index
    cfg = tiny_cfg(folder)
    files, tars = eval_samples(cfg, folder), eval_samples(cfg, tmp_path / "wds")
    assert sorted(files) == sorted(tars) == list(range(27))
    for i, (label, pixels) in files.items():
        assert tars[i][0] == label and torch.equal(tars[i][1], pixels)
    first = (tmp_path / "wds" / "shard-000000.idx").read_text().splitlines()
    assert first[0] == "v1.2 10" and first[1].split()[0::4] == ["jpg", "cls", "idx"]
    written = []  # canonical index of each sample, in tar order
    for tar in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(tar) as t:
            written += [int(t.extractfile(m).read()) for m in t if m.name.endswith(".idx")]
    assert sorted(written) == list(range(27))
    assert (written == list(range(27))) == (shuffle_seed is None)  # seeded shuffle, or the file order


def test_pack_index_files_equal_dalis_wds2idx(folder, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # DALI's tool, shipped with the wheel
    if shutil.which("tar") is None:
        pytest.skip("wds2idx needs GNU tar")
    pack(folder, tmp_path, shard_size=16, progress=False)
    for tar in sorted(tmp_path.glob("*.tar")):
        ref = tmp_path / (tar.stem + ".ref")
        with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as ic:
            ic.create_index()
        assert ref.read_text() == tar.with_suffix(".idx").read_text()


def test_file_list_root_from_scan_report_or_list_folder(folder, tmp_path):
    cfg = tiny_cfg(folder)
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))[:10]
    lst = tmp_path / "demo.filelist.txt"  # as `mscn data scan` writes: outside the dataset
    lst.write_text("".join(f"{r} {int(r[1])}\n" for r in rels))
    (tmp_path / "demo.scan.json").write_text(json.dumps({"root": str(folder)}))
    src = resolve_source(str(lst))
    assert src.kind == "filelist" and src.root == str(folder) and src.num_samples == 10
    got = eval_samples(cfg, lst)
    assert sorted(got) == list(range(10)) and [got[i][0] for i in range(10)] == [int(r[1]) for r in rels]
    (tmp_path / "c2").mkdir()  # no scan report: relative to the list's folder (DALI's rule)
    shutil.copy(folder / "c2" / "000.jpg", tmp_path / "c2" / "000.jpg")
    (tmp_path / "list.txt").write_text("c2/000.jpg 2\n")
    src = resolve_source(str(tmp_path / "list.txt"))
    assert src.root == str(tmp_path) and src.files == ("c2/000.jpg",) and src.labels == (2,)


def test_missing_paths_are_one_line_data_errors(folder, tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_source(str(tmp_path / "nope"))
    bad = tmp_path / "bad.txt"
    bad.write_text("c0/missing.jpg 0\n")
    with pytest.raises(DataError, match="missing file"):
        resolve_source(str(bad), file_root=str(folder))
    (tmp_path / "shards").mkdir()
    shutil.copy(folder / "c0" / "000.jpg", tmp_path / "shards" / "x.tar")
    with pytest.raises(DataError, match="missing DALI index"):
        resolve_source(str(tmp_path / "shards"))


def test_corrupt_jpeg_is_named(tmp_path):
    root = make_folder(tmp_path, classes=2, per_class=6)
    bad = root / "c1" / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
    # without the check of the training files at the start (test_training_files_are_checked_...):
    # the training loader names it when DALI fails on it; the evaluation loader before DALI reads it
    cfg = tiny_cfg(root, "train.global_batch=4", "data.check_files=false")
    for build in (lambda: build_train_loader(cfg, apply_mask=False), lambda: build_eval_loader(cfg, str(root),
                                                                                               batch_size=4)):
        with pytest.raises(DataError) as e:
            loader = build()
            for _ in range(2):
                for _ in loader:
                    pass
        assert str(bad) in str(e.value) and "mscn data scan" in str(e.value)
    # through data.feed_thread's worker: the same one-line error, raised in the caller
    from mscn.pipelines import endless
    from mscn.pipelines.feeder import Feeder

    loader = build_train_loader(cfg, apply_mask=False)
    fed = Feeder(endless(loader), snapshot=loader.state_dict)
    with pytest.raises(DataError) as e:
        for _ in range(2 * len(loader)):
            next(fed)
    assert str(bad) in str(e.value) and "mscn data scan" in str(e.value)
    fed.close()


def test_a_file_that_is_no_image_is_named_without_pil_internals(tmp_path):
    root = make_folder(tmp_path, classes=2, per_class=6)
    bad = root / "c0" / "notes.jpg"
    bad.write_text("not an image at all\n" * 20)
    loader = build_train_loader(tiny_cfg(root, "train.global_batch=4", "data.check_files=false"), apply_mask=False)
    with pytest.raises(DataError) as e:
        for _ in range(2):
            for _ in loader:
                pass
    msg = str(e.value)
    assert f"{bad}: cannot be decoded (PIL cannot identify it as an image;" in msg
    assert "BytesIO" not in msg and " at 0x" not in msg


def test_an_image_format_dali_cannot_decode_is_named(tmp_path):
    """A GIF named .jpg: PIL reads it, DALI stops with "nvImageCodec failure" naming no file."""
    from PIL import Image

    root = make_folder(tmp_path, classes=2, per_class=6)
    bad = root / "c1" / "anim.jpg"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad, format="GIF")
    loader = build_train_loader(tiny_cfg(root, "train.global_batch=4", "data.check_files=false"), apply_mask=False)
    with pytest.raises(DataError) as e:
        for _ in range(2):
            for _ in loader:
                pass
    assert f"{bad}: cannot be decoded (a GIF image, which DALI cannot decode" in str(e.value)


def test_an_empty_file_in_training_is_named_as_empty(tmp_path):
    """DALI's reader stops on it with "File mapping failed: <path>"; it was said as "DALI
    failed while reading the dataset", the cause left to guess."""
    root = make_folder(tmp_path, classes=2, per_class=6)
    bad = root / "c1" / "empty.jpg"
    bad.write_bytes(b"")
    loader = build_train_loader(tiny_cfg(root, "train.global_batch=4", "data.check_files=false"), apply_mask=False)
    with pytest.raises(DataError) as e:
        for _ in range(2):
            for _ in loader:
                pass
    assert str(e.value).startswith(f"{bad}: an empty file (DALI: File mapping failed"), str(e.value)
    assert f"run `mscn data scan {root}`" in str(e.value)


def test_small_gray_cmyk_and_png_images_come_out_rgb(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    make_image(rng, (12, 9)).save(tmp_path / "a" / "tiny.jpg")  # smaller than the 32 px crop
    make_image(rng).convert("L").save(tmp_path / "a" / "gray.jpg")
    make_image(rng).convert("CMYK").save(tmp_path / "a" / "cmyk.jpg")
    make_image(rng).convert("RGBA").save(tmp_path / "a" / "rgba.png")
    Image.fromarray(np.full((40, 30), 7, np.uint8), "L").save(tmp_path / "a" / "flat.png")
    cfg = tiny_cfg(tmp_path, "train.global_batch=5")
    batch = next(iter(build_train_loader(cfg, apply_mask=False)))
    assert all(v.shape == (5, 3, 32, 32) and torch.isfinite(v.float()).all() for v in batch.views)
    got = eval_samples(cfg, tmp_path)
    assert sorted(got) == list(range(5)) and all(v.shape == (3, 32, 32) for _, v in got.values())


def test_foreign_tars_without_index_members(folder, tmp_path):
    """A webdataset made elsewhere: image + multi-digit .cls, no .idx -> index -1."""
    (tmp_path / "w").mkdir()
    tar_path = tmp_path / "w" / "part-0.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k, img in enumerate(sorted((folder / "c1").glob("*.jpg"))[:5]):
            tar.add(img, arcname=f"sample{k}.jpeg")
            data = str(12345 + k).encode()
            info = tarfile.TarInfo(f"sample{k}.cls")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_dali_index(tar_path, tar_path.with_suffix(".idx"))
    src = resolve_source(str(tmp_path / "w"))
    assert src.kind == "wds" and not src.has_index and src.num_samples == 5
    batches = list(build_eval_loader(tiny_cfg(folder), str(tmp_path / "w"), batch_size=5))
    assert len(batches) == 1
    assert sorted(batches[0].labels.tolist()) == list(range(12345, 12350))
    assert batches[0].index.tolist() == [-1] * 5


@pytest.mark.parametrize("label_ext", [None, "CLS"])
def test_shards_of_images_alone_or_with_uppercase_labels_train(folder, tmp_path, label_ext):
    """Shards whose samples hold an image only (no .cls, no .idx): DALI's reader returns one
    output for one extension, not a list, and the loader failed with a TypeError. A .CLS
    (upper case, read as .cls by the reader) made the shards count as unlabelled."""
    (tmp_path / "w").mkdir()
    tar_path = tmp_path / "w" / "part-0.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k, img in enumerate(sorted((folder / "c1").glob("*.jpg"))[:6]):
            members = [(f"s{k}.JPG", img.read_bytes())] + ([(f"s{k}.{label_ext}", str(7 + k % 2).encode())]
                                                           if label_ext else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_dali_index(tar_path, tar_path.with_suffix(".idx"))
    source = resolve_source(str(tmp_path / "w"))
    assert source.labelled == bool(label_ext)
    batch = next(iter(build_train_loader(tiny_cfg(tmp_path / "w", "train.global_batch=6"), apply_mask=False)))
    assert len(batch.views) == 4 and batch.views[0].shape == (6, 3, 32, 32)
    assert sorted(batch.labels.tolist()) == ([7, 7, 7, 8, 8, 8] if label_ext else [-1] * 6)


def test_scan_out_list_is_usable_as_data_root_from_any_directory(tmp_path, monkeypatch):
    """`mscn data scan ROOT --out lists/x.txt` puts its report beside the list with an
    absolute root, so the readers find the dataset from another working directory."""
    from mscn.cli import main

    root = make_folder(tmp_path / "ds" / "train", classes=2, per_class=3)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "scan", "ds/train", "--out", "lists/x.txt", "--workers", "1"]) == 0
    assert (tmp_path / "lists" / "x.scan.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    source = resolve_source("../lists/x.txt")
    assert source.num_samples == 6 and Path(source.root).resolve() == root.resolve()


def test_a_hand_built_loader_names_a_file_no_decoder_takes(tmp_path):
    """A DaliLoader built from views_pipeline by another project has no replay of its
    reader: the file is found by its first and last bytes instead (mscn.data.filecheck). Damage
    inside a JPEG's data cannot be found that way, and the message says the file is not named
    and which loader would."""
    from nvidia.dali.plugin.pytorch import LastBatchPolicy

    from mscn.config import ViewCfg
    from mscn.pipelines import DaliLoader, resolve_source, views_pipeline

    def run(root):
        source = resolve_source(str(root))
        views = [ViewCfg(), ViewCfg()]
        pipe = views_pipeline(source, views, image_size=32, highpass=None, batch_size=4, num_threads=1,
                              device_id=None, seed=1)
        loader = DaliLoader(pipe, source, len(views), policy=LastBatchPolicy.DROP)
        with pytest.raises(DataError) as e:
            for _ in range(2):
                for _ in loader:
                    pass
        return str(e.value)

    root = make_folder(tmp_path / "text", classes=2, per_class=6)
    bad = root / "c0" / "notes.jpg"
    bad.write_text("not an image at all\n" * 20)
    msg = run(root)
    assert msg.startswith(f"{bad}: cannot be decoded (no JPEG, PNG, BMP, TIFF, JPEG 2000, WebP or PNM header"), msg

    root = make_folder(tmp_path / "cut", classes=2, per_class=6)
    cut = root / "c1" / "cut.jpg"
    cut.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)  # a JPEG's header, then garbage: cut short
    msg = run(root)
    assert msg.startswith(f"{cut}: cannot be decoded (a JPEG cut short"), msg
    # a header that walks to its scan and an end marker, but a Huffman table of 0xFF bytes:
    # only DALI finds it
    cut.write_bytes(bad_huffman_jpeg((root / "c0" / "000.jpg").read_bytes()))
    msg = run(root)
    assert msg.startswith(f"{root}: DALI failed while reading the dataset (") and \
        "a DaliLoader built without a replay cannot name the file" in msg, msg
