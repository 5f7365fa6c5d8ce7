"""Labels by class name, unlabelled data, and the data tools' handling of bad and small files.

Real files, the real DALI CPU pipeline and the real pretraining loop; tiny sizes.
"""
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mscn.config import load_config
from mscn.data.pack import pack
from mscn.data.shardindex import write_dali_index
from mscn.data.scan import scan
from mscn.data.source import resolve_source
from mscn.errors import DataError
from mscn.pipelines import build_eval_loader
from pipeline_fixtures import make_folder, make_image, tiny_cfg


def _labels_by_file(loader, source) -> dict[str, int]:
    return {source.files[i]: y for b in loader for i, y in zip(b.index.tolist(), b.labels.tolist())}


def test_val_subset_of_classes_keeps_the_train_labels(tmp_path):
    train = make_folder(tmp_path / "train", classes=4, per_class=2)
    val = tmp_path / "val"
    for c in ("c1", "c3"):  # 2 of the 4 classes: their own folder indices would be 0 and 1
        shutil.copytree(train / c, val / c)
    classes = resolve_source(str(train)).classes
    assert classes == ("c0", "c1", "c2", "c3")
    src = resolve_source(str(val), classes=classes)
    loader = build_eval_loader(tiny_cfg(train), str(val), batch_size=4, classes=classes)
    got = _labels_by_file(loader, src)
    assert got == {f: int(f[1]) for f in src.files} and set(got.values()) == {1, 3}
    (val / "zebra").mkdir()
    (val / "c1" / "000.jpg").rename(val / "zebra" / "000.jpg")
    with pytest.raises(DataError, match="class 'zebra' is not among the 4 classes of the training set"):
        resolve_source(str(val), classes=classes)



def test_a_list_without_class_names_may_not_label_past_the_training_classes(tmp_path):
    """A hand-written list (no scan report beside it, so no class names) evaluated against a
    training set of 4 classes: its labels are taken as those classes' numbers, and a label
    of 7 was passed through to the probe. It is named; a label in range is taken as it is."""
    train = make_folder(tmp_path / "train", classes=4, per_class=2)
    classes = resolve_source(str(train)).classes
    listed = tmp_path / "val.txt"
    listed.write_text("c0/000.jpg 0\nc3/001.jpg 7\n")
    with pytest.raises(DataError, match=r"val.txt: label 7 \(c3/001.jpg\) is outside the 4 classes of the "
                                        r"training set \(0-3\)"):
        build_eval_loader(tiny_cfg(train), str(train), file_list=str(listed), batch_size=2, classes=classes)
    listed.write_text("c0/000.jpg 0\nc3/001.jpg 3\n")
    loader = build_eval_loader(tiny_cfg(train), str(train), file_list=str(listed), batch_size=2, classes=classes)
    assert sorted(y for b in loader for y in b.labels.tolist()) == [0, 3]
    with pytest.raises(DataError, match=r"absent.txt: no such file or directory \(file_list\)"):
        build_eval_loader(tiny_cfg(train), str(train), file_list=str(tmp_path / "absent.txt"), classes=classes)


def test_a_class_name_in_another_unicode_form_is_the_same_class(tmp_path):
    """A copy made on macOS names 'café' in NFD ('e' + a combining accent): other bytes,
    the same name. It keeps its label; a different name is still refused."""
    train = make_folder(tmp_path / "train", classes=2, per_class=2)
    (train / "c1").rename(train / "caf\u00e9")  # NFC
    classes = resolve_source(str(train)).classes
    val = tmp_path / "val"
    shutil.copytree(train / "caf\u00e9", val / "cafe\u0301")  # NFD
    src = resolve_source(str(val), classes=classes)
    assert set(src.labels) == {classes.index("caf\u00e9")} == {1}
    # packed, the shards' classes keep the NFD name: still the training set's numbering
    shutil.copytree(train / "c0", val / "c0")
    pack(val, tmp_path / "wds", shard_size=8, progress=False, workers=1)
    assert resolve_source(str(tmp_path / "wds"), classes=classes).num_samples == 4
    shutil.rmtree(val / "c0")
    (val / "cafe\u0301").rename(val / "cafe")
    with pytest.raises(DataError, match="class 'cafe' is not among the 2 classes"):
        resolve_source(str(val), classes=classes)


def test_unlabelled_flat_folder_list_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        make_image(rng).save(flat / f"{i}.jpg", quality=90)
    src = resolve_source(str(flat))
    assert src.kind == "folder" and not src.labelled and src.labels == (-1,) * 6
    (tmp_path / "list.txt").write_text("".join(f"{i}.jpg\n" for i in range(6)))
    lst = resolve_source(str(tmp_path / "list.txt"), file_root=str(flat))
    assert not lst.labelled and lst.files == src.files
    pack(flat, tmp_path / "wds", shard_size=4, progress=False, workers=1)
    wds = resolve_source(str(tmp_path / "wds"))
    assert wds.kind == "wds" and not wds.labelled and wds.num_samples == 6
    batches = list(build_eval_loader(tiny_cfg(flat), str(tmp_path / "wds"), batch_size=3))
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(6))
    assert {y for b in batches for y in b.labels.tolist()} == {-1}


@pytest.mark.usefixtures("one_torch_thread")
def test_flat_unlabelled_folder_pretrains_with_the_monitor_off(tmp_path, capsys):
    from mscn.train.pretrain import run_pretrain

    rng = np.random.default_rng(0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        make_image(rng).save(flat / f"{i}.jpg", quality=90)
    labelled_val = make_folder(tmp_path / "val", classes=2, per_class=2)
    gentle = "{jitter_prob: 0.0, blur_prob: 0.0, grayscale_prob: 0.0, mask: {ratio: 0.0, grid: 8}}"
    cfg = load_config(None, [f"data.root={flat}", f"data.val_root={labelled_val}", "data.image_size=32",
                             "data.num_threads=1", "highpass.sigma=1.0", f"views=[{gentle}, {gentle}]",
                             "model.arch=resnet18", "model.proj_hidden=32", "model.proj_out=16",
                             "train.global_batch=4", "train.device=cpu", "schedule.epochs=1",
                             "schedule.warmup_epochs=0", "train.knn_every_epochs=1", "train.max_steps=2",
                             f"train.out_dir={tmp_path / 'run'}", "train.log_every=1"])
    summary = run_pretrain(cfg, resume="auto")
    assert summary["step"] == 2
    out = capsys.readouterr().out
    assert out.count("kNN monitor off: data.root") == 1 and "has no labels" in out


def _broken_jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(np.random.default_rng(seed)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    return bytes(data[: len(data) // 2])  # truncated: PIL and DALI both refuse it


def test_pack_skips_and_lists_files_that_do_not_decode(tmp_path):
    root = make_folder(tmp_path / "ds", classes=2, per_class=3)
    (root / "c1" / "broken.jpg").write_bytes(_broken_jpeg(1))
    (root / "c0" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"(broken|empty)\.jpg: does not decode .*2 such file"):
        pack(root, tmp_path / "strict", progress=False, workers=1, strict=True)
    s = pack(root, tmp_path / "wds", shard_size=4, progress=False, workers=1)
    assert s["num_samples"] == 6 and sorted(s["skipped"]) == ["c0/empty.jpg", "c1/broken.jpg"]
    meta = json.loads((tmp_path / "wds" / "sources.json").read_text())
    assert meta["classes"] == ["c0", "c1"] and len(meta["files"]) == 6 and "c1/broken.jpg" not in meta["files"]
    assert resolve_source(str(tmp_path / "wds")).num_samples == 6


def test_decode_error_from_a_shard_names_the_source_file(tmp_path):
    root = make_folder(tmp_path / "ds", classes=2, per_class=3)
    pack(root, tmp_path / "wds", shard_size=8, progress=False, workers=1, shuffle_seed=None)
    tar_path = tmp_path / "wds" / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:  # garbage over the 5th image's bytes, same size
        m = tar.getmember("000000004.jpg")
    raw = bytearray(tar_path.read_bytes())
    raw[m.offset_data:m.offset_data + m.size] = b"\x00" * m.size
    tar_path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        for _ in build_eval_loader(tiny_cfg(root), str(tmp_path / "wds"), batch_size=2):
            pass
    assert str(root / "c1" / "001.jpg") in str(e.value)  # canonical index 4 = the 2nd image of c1


def test_scan_keeps_a_small_decodable_jpeg_and_reports_it(tmp_path):
    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    make_image(np.random.default_rng(3), (12, 9)).save(root / "c0" / "small.jpg", quality=90)
    report = scan(root, out=tmp_path / "l.txt", workers=1, progress=False)
    assert "c0/small.jpg 0" in (tmp_path / "l.txt").read_text().splitlines()
    assert {"path": "c0/small.jpg", "reason": "small", "detail": "12x9, short side < 32 (kept: the crops upsample it)",
            "excluded": False} in report["issues"]
    report = scan(root, out=tmp_path / "m.txt", min_size=10, workers=1, progress=False)  # on purpose
    assert "c0/small.jpg 0" not in (tmp_path / "m.txt").read_text() and report["counts"]["tiny"] == 1
    assert Image.open(root / "c0" / "small.jpg").size == (12, 9)


def test_a_shard_cut_short_is_named_before_the_reader_starts(tmp_path):
    root = make_folder(tmp_path / "ds", classes=2, per_class=3)
    pack(root, tmp_path / "wds", shard_size=4, progress=False, workers=1)
    assert resolve_source(str(tmp_path / "wds")).num_samples == 6
    tar_path = tmp_path / "wds" / "shard-000000.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:12000])  # an interrupted copy
    with pytest.raises(DataError, match=r"shard-000000.tar: 12000 bytes, but its index shard-000000.idx places "
                                        r"data up to byte \d+: the shard is cut short"):
        resolve_source(str(tmp_path / "wds"))


def test_an_unfinished_pack_mixed_packs_and_compressed_shards_are_refused_by_name(tmp_path):
    """A pack killed between shards leaves whole shards of part of the set: read as they are,
    they would train on that part without a word."""
    root = make_folder(tmp_path / "ds", classes=2, per_class=3)
    out = tmp_path / "wds"
    pack(root, out, shard_size=4, progress=False, workers=1)
    assert not (out / ".packing").exists() and resolve_source(str(out)).num_samples == 6
    # as a kill after the first shard leaves it: the marker, one shard, no sources.json
    (out / ".packing").write_text("mscn data pack ...\n")
    with pytest.raises(DataError, match=r"wds: an `mscn data pack` that did not finish \(.packing is there\)"):
        resolve_source(str(out))
    (out / ".packing").unlink()
    (out / "shard-000001.tar.tmp").write_bytes(b"")
    with pytest.raises(DataError, match=r"did not finish \(shard-000001.tar.tmp is there\)"):
        resolve_source(str(out))
    (out / "shard-000001.tar.tmp").unlink()
    # a shard gone (or one of another pack): sources.json and the indexes disagree
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.idx").unlink()
    with pytest.raises(DataError, match=r"sources.json lists 6 packed images but the shards' indexes hold 4"):
        resolve_source(str(out))
    # compressed shards are not read by DALI: named, alone or beside plain ones
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "shard-000000.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match=r"gz: compressed shards \(shard-000000.tar.gz\): DALI reads plain .tar only"):
        resolve_source(str(gz))


def test_an_index_older_than_its_shard_is_refused_at_the_start(tmp_path):
    """A shard rewritten after its .idx was made (here: the index of another pack of the same
    files), or appended to: DALI would read the wrong bytes, or leave the new samples out."""
    root = make_folder(tmp_path / "ds", classes=2, per_class=4)
    pack(root, tmp_path / "a", shard_size=8, progress=False, workers=1, shuffle_seed=0)
    pack(root, tmp_path / "b", shard_size=8, progress=False, workers=1, shuffle_seed=1)
    shutil.copy(tmp_path / "a" / "shard-000000.idx", tmp_path / "b" / "shard-000000.idx")
    with pytest.raises(DataError, match=r"shard-000000.idx: not the index of .*shard-000000.tar as it is now"):
        resolve_source(str(tmp_path / "b"))
    # appended: `tar -r` / tarfile "a" writes over the end-of-archive blocks
    tar_path = tmp_path / "a" / "shard-000000.tar"
    with tarfile.open(tar_path, "a") as tar:
        for name, data in (("000000008.jpg", (root / "c0" / "000.jpg").read_bytes()), ("000000008.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"shard-000000.tar: holds samples after the last one its index "
                                        r"shard-000000.idx lists \(appended"):
        resolve_source(str(tmp_path / "a"))


def test_shards_indexed_as_they_are_pass_the_start_check(tmp_path):
    """Long member names (an extra pax header before the member's own), trailing
    non-file members and tar's zero padding are no reason to refuse a shard."""
    root = make_folder(tmp_path / "ds", classes=1, per_class=3)
    (tmp_path / "w").mkdir()
    tar_path = tmp_path / "w" / "part-0.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k, img in enumerate(sorted((root / "c0").glob("*.jpg"))):
            key = f"{'deep/' * 30}s{k}"  # 150-byte names
            tar.add(img, arcname=f"{key}.jpg")
            info = tarfile.TarInfo(f"{key}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
        tar.addfile(_dir_info("zz/"))  # a trailing folder entry: not a sample
    write_dali_index(tar_path, tar_path.with_suffix(".idx"))
    assert resolve_source(str(tmp_path / "w")).num_samples == 3
    # the real wds2idx (GNU tar's listing) writes the same index
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar_path), str(tmp_path / "d.idx")],
                   check=True, capture_output=True)
    assert (tmp_path / "d.idx").read_text() == tar_path.with_suffix(".idx").read_text()
    # names in other letters at both ends (pax carries them; the header holds 'caf?'), and a
    # hidden file last, which wds2idx leaves out: indexed by wds2idx itself, accepted
    (tmp_path / "u").mkdir()
    tar_path = tmp_path / "u" / "part-0.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k, img in enumerate(sorted((root / "c0").glob("*.jpg"))):
            tar.add(img, arcname=f"caf\u00e9{k}.jpg")
            info = tarfile.TarInfo(f"caf\u00e9{k}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
        info = tarfile.TarInfo(".DS_Store")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar_path), str(tar_path.with_suffix(".idx"))],
                   check=True, capture_output=True)
    assert resolve_source(str(tmp_path / "u")).num_samples == 3
    assert len(list(build_eval_loader(tiny_cfg(root), str(tmp_path / "u"), batch_size=3))) == 1


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_an_index_stale_only_in_the_middle_is_named_when_a_sample_fails(tmp_path):
    """The start check reads the index's ends only. A rewrite that keeps both ends in place
    (here: one image grown by a block, a later one shrunk by a block) makes DALI read the
    wrong bytes in between; the decode failure then names the index, not a healthy image."""
    root = make_folder(tmp_path / "ds", classes=2, per_class=4)
    pack(root, tmp_path / "b", shard_size=8, progress=False, workers=1, shuffle_seed=None)
    tar_path = tmp_path / "b" / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name == "000000002.jpg":
                data += b"\0" * 512
            elif m.name == "000000005.jpg":
                data = data[:-512]
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert resolve_source(str(tmp_path / "b")).num_samples == 8  # both ends still fit
    with pytest.raises(DataError, match=r"shard-000000.idx: not the index of .*shard-000000.tar as it is now"):
        for _ in build_eval_loader(tiny_cfg(root), str(tmp_path / "b"), batch_size=2):
            pass


@pytest.mark.parametrize("drop, lacks", [("000000003.cls", "no .cls"), ("000000004.jpg", "no image")])
def test_a_shard_sample_without_a_member_is_named(tmp_path, drop, lacks):
    """DALI reports it as an "Underful sample" at an index line; the message names the
    sample, its shard and what it lacks."""
    root = make_folder(tmp_path / "ds", classes=2, per_class=3)
    pack(root, tmp_path / "w", shard_size=8, progress=False, workers=1, shuffle_seed=None)
    tar_path = tmp_path / "w" / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name != drop]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    write_dali_index(tar_path, tar_path.with_suffix(".idx"))
    with pytest.raises(DataError) as e:
        for _ in build_eval_loader(tiny_cfg(root), str(tmp_path / "w"), batch_size=2):
            pass
    key = drop.split(".")[0]
    assert str(e.value).startswith(f"{tar_path}: sample '{key}' has {lacks} (it has "), e.value
