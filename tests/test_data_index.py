"""`mscn data index`: DALI indexes for shards mscn did not pack, or changed after packing.

DALI's own `wds2idx` places the data of GNU tar's long-named members 1,024 bytes early; the
start check refuses such an index, and the fix it names must make one that the real DALI
reader decodes."""
import gzip
import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mscn.cli import main as mscn_main
from mscn.data.pack import pack
from mscn.data.source import PACKING, resolve_source
from mscn.errors import DataError
from mscn.pipelines import build_eval_loader
from pipeline_fixtures import make_folder, tiny_cfg


def _gnu_shard(root: Path, out: Path) -> Path:
    """One shard of root's images in GNU tar format with 120-byte member names (././@LongLink)."""
    out.mkdir(parents=True)
    tar_path = out / "part-0.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for k, img in enumerate(sorted(root.glob("c*/*.jpg"))):
            key = f"s{k}_" + "x" * 116
            tar.add(img, arcname=f"{key}.jpg")
            info = tarfile.TarInfo(f"{key}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(img.parent.name[1:].encode()))
    return tar_path


def _labels(cfg, root) -> list[int]:
    return [int(y) for b in build_eval_loader(cfg, str(root), batch_size=2) for y in b.labels]


def test_long_names_that_wds2idx_misplaces_are_indexed_right(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", classes=2, per_class=2)
    tar_path = _gnu_shard(root, tmp_path / "w")
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tar_path), str(tar_path.with_suffix(".idx"))], check=True, capture_output=True)
    # DALI's index points 1,024 bytes before each member's data: refused, with the fix named
    with pytest.raises(DataError, match=r"part-0.idx: not the index of .*wds2idx indexed member names over 100 "
                                        r"bytes.*`mscn data index .*w`"):
        resolve_source(str(tmp_path / "w"))
    assert mscn_main(["data", "index", str(tmp_path / "w"), "--check"]) == 1
    assert "part-0.tar: its index does not fit it" in capsys.readouterr().out
    assert mscn_main(["data", "index", str(tmp_path / "w")]) == 0
    assert "wrote 1 of 1 shard index(es)" in capsys.readouterr().out
    # the real reader decodes every sample, each with its label
    assert resolve_source(str(tmp_path / "w")).num_samples == 4
    assert sorted(_labels(tiny_cfg(root), tmp_path / "w")) == [0, 0, 1, 1]
    assert mscn_main(["data", "index", str(tmp_path / "w"), "--check"]) == 0
    assert mscn_main(["data", "index", str(tmp_path / "w")]) == 0
    assert "wrote 0 of 1 shard index(es) in" in capsys.readouterr().out  # one that fits is left as it is


def test_appended_and_missing_indexes_are_made_and_packed_ones_left(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", classes=2, per_class=2)
    pack(root, tmp_path / "p", shard_size=2, progress=False, workers=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "p").glob("*.idx")}
    (tmp_path / "p" / "shard-000001.idx").unlink()
    with pytest.raises(DataError, match=r"missing DALI index of shard-000001.tar; write it with `mscn data index"):
        resolve_source(str(tmp_path / "p"))
    tar_path = tmp_path / "p" / "shard-000000.tar"
    with tarfile.open(tar_path, "a") as tar:  # a sample appended after packing
        for name, data in (("000000009.jpg", (root / "c1" / "001.jpg").read_bytes()), ("000000009.cls", b"1"),
                           ("000000009.idx", b"3")):  # a whole sample, as pack writes them
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"shard-000000.tar: holds samples after .*: `mscn data index .*p`"):
        resolve_source(str(tmp_path / "p"))
    assert mscn_main(["data", "index", str(tmp_path / "p"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "shard-000000.tar: its index does not fit it" in out and "shard-000001.tar: it has no index" in out
    assert not (tmp_path / "p" / "shard-000001.idx").exists()  # --check writes nothing
    assert mscn_main(["data", "index", str(tmp_path / "p")]) == 0
    assert "wrote 2 of 2 shard index(es)" in capsys.readouterr().out
    assert (tmp_path / "p" / "shard-000001.idx").read_bytes() == before["shard-000001.idx"]  # the same as pack's
    # the appended sample is read now; sources.json still lists the packed 4, which the reader says
    with pytest.raises(DataError, match=r"sources.json lists 4 packed images but the shards' indexes hold 5"):
        resolve_source(str(tmp_path / "p"))


def test_bad_shards_are_one_line_and_leave_every_index_as_it_was(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    tar_path = _gnu_shard(root, tmp_path / "w")
    shutil.copy(tar_path, tmp_path / "w" / "part-1.tar")
    cases = {
        "cut short": (lambda p: p.write_bytes(tar_path.read_bytes()[:2000]), r"part-1.tar: (not a readable plain tar|cut short)"),
        "empty": (lambda p: p.write_bytes(b""), r"part-1.tar: not a readable plain tar \(empty file"),
        "gzip": (lambda p: p.write_bytes(gzip.compress(tar_path.read_bytes())),
                 r"part-1.tar: not a readable plain tar .*DALI reads uncompressed .tar only"),
        "no sample": (lambda p: tarfile.open(p, "w").close(), r"part-1.tar: holds no sample"),
    }
    for name, (spoil, msg) in cases.items():
        spoil(tmp_path / "w" / "part-1.tar")
        assert mscn_main(["data", "index", str(tmp_path / "w")]) == 2, name
        err = capsys.readouterr().err
        assert err.count("mscn: error:") == 1 and re.search(msg, err.splitlines()[-1]), (name, err)
        assert not list((tmp_path / "w").glob("*.idx")), name  # part-0's index not written either
    for argv, msg in (([str(tmp_path / "nope")], "no such folder of .tar shards"),
                      ([str(root)], "no .tar shards to index"),
                      ([str(root / "c0" / "000.jpg")], "neither a folder of .tar shards nor a .tar file")):
        assert mscn_main(["data", "index", *argv]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "w" / PACKING).write_text("")
    assert mscn_main(["data", "index", str(tmp_path / "w")]) == 2
    assert "an `mscn data pack` that did not finish" in capsys.readouterr().err
    # one .tar given alone
    (tmp_path / "w" / PACKING).unlink()
    assert mscn_main(["data", "index", str(tar_path)]) == 0
    assert tar_path.with_suffix(".idx").is_file() and not (tmp_path / "w" / "part-1.idx").exists()


def test_a_sample_with_two_images_is_noted(tmp_path, capsys):
    """DALI decodes one image of a sample with x.jpg and x.png and logs a raw C++ line about it:
    the index command names such samples."""
    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    (tmp_path / "w").mkdir()
    with tarfile.open(tmp_path / "w" / "a.tar", "w") as tar:
        for k, img in enumerate(sorted(root.glob("c0/*.jpg"))):
            tar.add(img, arcname=f"k{k}.jpg")
            if k == 1:
                tar.add(img, arcname=f"k{k}.PNG")  # mscn's reader matches extensions in any case
    assert mscn_main(["data", "index", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "a.tar: 1 sample(s) hold more than one image (k1); DALI decodes one of each" in out
    (tmp_path / "w" / "b.tar").write_bytes((tmp_path / "w" / "a.tar").read_bytes())
    (tmp_path / "w" / "a.tar").unlink()
    (tmp_path / "w" / "a.idx").unlink()
    with tarfile.open(tmp_path / "w" / "b.tar", "w") as tar:
        tar.add(root / "c0" / "000.jpg", arcname="k0.jpg")
    assert mscn_main(["data", "index", str(tmp_path / "w")]) == 0
    assert "more than one image" not in capsys.readouterr().out


def test_a_source_digest_is_what_is_read_not_where():
    """What the ranks compare at the start of a multi-rank run (check_same_data)."""
    import dataclasses

    from mscn.data.source import Source

    a = Source("folder", "/mnt/a/train", 2, files=("c0/x.jpg", "c1/y.jpg"), labels=(0, 1), classes=("c0", "c1"))
    assert dataclasses.replace(a, root="/data/train").digest() == a.digest()  # another mount point
    assert dataclasses.replace(a, labels=(1, 0)).digest() != a.digest()
    assert dataclasses.replace(a, files=("c0/x.jpg", "c1/z.jpg")).digest() != a.digest()
    w = Source("wds", "/a", 10, tars=("/a/s0.tar", "/a/s1.tar"), indexes=("/a/s0.idx", "/a/s1.idx"))
    assert dataclasses.replace(w, root="/b", tars=("/b/s0.tar", "/b/s1.tar")).digest() == w.digest()
    assert dataclasses.replace(w, num_samples=11).digest() != w.digest()


def test_names_with_spaces_and_incomplete_samples_are_refused(tmp_path, capsys):
    """A name with a space would write an index DALI misreads; a sample whose .cls stands away
    from its image would stop the reader mid-epoch ("Underful sample")."""
    root = make_folder(tmp_path / "ds", classes=1, per_class=2)
    jpgs = sorted(root.glob("c0/*.jpg"))
    (tmp_path / "w").mkdir()

    def shard(names):
        with tarfile.open(tmp_path / "w" / "a.tar", "w") as tar:
            for name in names:
                if name.endswith(".cls"):
                    info = tarfile.TarInfo(name)
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"0"))
                else:
                    tar.add(jpgs[0], arcname=name)

    for names, msg in ((["my pic.jpg", "my pic.cls"], r"member 'my pic.jpg' has whitespace in its name"),
                       (["k.v 2.jpg", "k.v 2.cls"], r"member 'k.v 2.jpg' has whitespace"),
                       # members apart: [a.jpg] [b.jpg] [a.cls] [b.cls] are four samples to DALI
                       (["a.jpg", "b.jpg", "a.cls", "b.cls"], r"sample 'a' \(a.cls\) lacks an image, unlike the"),
                       (["a.jpg", "a.cls", "b.cls"], r"sample 'b' \(b.cls\) lacks an image"),
                       (["a.jpg", "a.cls", "b.jpg"], r"sample 'b' \(b.jpg\) lacks .cls"),
                       (["a.cls", "b.jpg", "b.cls"], r"sample 'a' \(a.cls\) lacks an image")):
        shard(names)
        assert mscn_main(["data", "index", str(tmp_path / "w")]) == 2, names
        err = capsys.readouterr().err
        assert re.search(msg, err) and "Traceback" not in err, (names, err)
        assert not (tmp_path / "w" / "a.idx").exists()
    # members the reader does not ask for (a .json) are optional; a .cls missing from the first
    # sample makes the shard unlabelled, as the reader decides from the first sample
    for names in (["a.jpg", "a.cls", "a.json", "b.jpg", "b.cls"], ["a.jpg", "b.jpg", "b.cls"]):
        shard(names)
        assert mscn_main(["data", "index", str(tmp_path / "w")]) == 0, (names, capsys.readouterr().err)
        (tmp_path / "w" / "a.idx").unlink()
