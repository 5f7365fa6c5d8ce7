"""mscn/data/checkstamp.py: a restart does not read an unchanged, checked set again, and a
file changed in place (same name, same size) is read again.

Each test ages its files past checkstamp.RACY_S first (the kernel's change time cannot be
set back), and clears filecheck's once-per-process memory to stand for a new process.
"""
import os
import shutil
import time

import pytest

from eval_testdata import make_image_folder

from mscn.data import checkstamp, filecheck
from mscn.data.source import resolve_source
from mscn.errors import DataError


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh stamp folder, a new 'process' per call of ``new_process()``, and how many
    times the files of a share were read."""
    monkeypatch.setenv("MSCN_CACHE_DIR", str(tmp_path / "stamps"))
    reads = []
    real = filecheck._first_bad_in

    def reading(*args, **kw):
        reads.append(args[1:3])
        return real(*args, **kw)

    monkeypatch.setattr(filecheck, "_first_bad_in", reading)

    def new_process():
        monkeypatch.setattr(filecheck, "_CHECKED", set())

    return reads, new_process


def _aged_folder(path, **kw):
    root = make_image_folder(path, **kw)
    time.sleep(checkstamp.RACY_S + 0.1)
    return root


def _zero_header(path):
    """The file's first 16 bytes overwritten with zeros: the same name, size and inode."""
    with open(path, "r+b") as f:
        f.write(bytes(16))


def test_an_unchanged_set_is_not_read_again_and_a_file_changed_in_place_is(tmp_path, counted):
    reads, new_process = counted
    root = _aged_folder(tmp_path / "img", classes=2, per_class=4)
    assert filecheck.check_training_files(resolve_source(str(root))) is None  # read
    assert reads == [(0, 1)] and len(list((tmp_path / "stamps").glob("*.json"))) == 1
    new_process()
    before = filecheck.check_training_files(resolve_source(str(root)))
    assert before and before.endswith("UTC") and reads == [(0, 1)], (before, reads)  # not read again
    new_process()
    filecheck.check_headers(resolve_source(str(root)))  # an evaluation set: its own stamp (one rank, whole)
    assert reads == [(0, 1)], reads
    bad = root / "c1" / "002.jpg"
    st = bad.stat()
    _zero_header(bad)
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))  # its times put back, as `cp -p` or `rsync -t` do
    assert (bad.stat().st_size, bad.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    time.sleep(checkstamp.RACY_S + 0.1)  # not racy: only its change time tells
    new_process()
    with pytest.raises(DataError, match=f"{bad}: no JPEG, PNG"):
        filecheck.check_training_files(resolve_source(str(root)))
    new_process()
    with pytest.raises(DataError, match=f"{bad}: no JPEG, PNG"):
        filecheck.check_headers(resolve_source(str(root)))


def test_a_stamp_covers_its_rank_and_number_of_ranks_only(tmp_path, counted):
    reads, new_process = counted
    root = _aged_folder(tmp_path / "img", classes=2, per_class=4)
    source = resolve_source(str(root))
    filecheck.check_training_files(source, 0, 2)
    new_process()
    assert filecheck.check_training_files(source, 0, 2) is not None  # stamped
    for rank, world in ((1, 2), (0, 1), (0, 3)):
        new_process()
        assert filecheck.check_training_files(source, rank, world) is None, (rank, world)
    assert reads == [(0, 2), (1, 2), (0, 1), (0, 3)], reads
    # a copy of the set (the same names and digest) has its own stamp
    shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy)
    time.sleep(checkstamp.RACY_S + 0.1)
    new_process()
    assert filecheck.check_training_files(resolve_source(str(tmp_path / "copy")), 0, 1) is None


def test_no_stamp_for_files_changed_within_a_tick_or_with_stamps_off(tmp_path, counted, monkeypatch):
    reads, new_process = counted
    root = _aged_folder(tmp_path / "fresh", classes=2, per_class=3)
    for _ in range(2):
        new_process()
        (root / "c1" / "001.jpg").touch()  # just changed: racy (touched here, not timed: a slow machine)
        filecheck.check_training_files(resolve_source(str(root)))
    assert len(reads) == 2 and not (tmp_path / "stamps").exists(), reads

    time.sleep(checkstamp.RACY_S + 0.1)
    monkeypatch.setenv("MSCN_CACHE_DIR", "off")
    for _ in range(2):
        new_process()
        assert filecheck.check_training_files(resolve_source(str(root))) is None
    assert len(reads) == 4 and not (tmp_path / "stamps").exists(), reads


def test_a_stamp_that_cannot_be_written_or_read_is_no_error(tmp_path, counted, monkeypatch):
    reads, new_process = counted
    root = _aged_folder(tmp_path / "img", classes=2, per_class=3)
    (tmp_path / "not_a_dir").write_text("a file where the stamps' folder would be\n")
    monkeypatch.setenv("MSCN_CACHE_DIR", str(tmp_path / "not_a_dir" / "stamps"))
    filecheck.check_training_files(resolve_source(str(root)))
    new_process()
    filecheck.check_training_files(resolve_source(str(root)))
    assert len(reads) == 2, reads
    # a damaged stamp (a disk that filled up) is read past
    monkeypatch.setenv("MSCN_CACHE_DIR", str(tmp_path / "stamps"))
    new_process()
    filecheck.check_training_files(resolve_source(str(root)))
    for stamp in (tmp_path / "stamps").glob("*.json"):
        stamp.write_text('{"key": [')
    new_process()
    assert filecheck.check_training_files(resolve_source(str(root))) is None
    assert len(reads) == 4, reads


def test_tar_shards_changed_in_place_are_read_again(tmp_path, counted):
    from mscn.data.pack import pack

    reads, new_process = counted
    root = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    pack(root, tmp_path / "wds", shard_size=3, progress=False, workers=1)
    time.sleep(checkstamp.RACY_S + 0.1)
    filecheck.check_training_files(resolve_source(str(tmp_path / "wds")), 1, 2)
    new_process()
    assert filecheck.check_training_files(resolve_source(str(tmp_path / "wds")), 1, 2) is not None
    new_process()  # the same shards, another rank's share
    assert filecheck.check_training_files(resolve_source(str(tmp_path / "wds")), 0, 2) is None
    assert reads == [(1, 2), (0, 2)], reads
    # zeros over the header of the 2nd sample's image (rank 1's first) in the first shard
    tar = sorted((tmp_path / "wds").glob("*.tar"))[0]
    fields = tar.with_suffix(".idx").read_text().splitlines()[2].split()
    at = next(i for i in range(0, len(fields), 4) if fields[i] == "jpg")
    with open(tar, "r+b") as f:
        f.seek(int(fields[at + 1]))
        f.write(bytes(16))
    time.sleep(checkstamp.RACY_S + 0.1)
    new_process()
    with pytest.raises(DataError, match="no JPEG, PNG"):
        filecheck.check_training_files(resolve_source(str(tmp_path / "wds")), 1, 2)


def test_stamps_unused_for_months_are_removed_and_used_ones_are_kept(tmp_path, monkeypatch):
    """Stamps were never cleaned up: one per data set, rank and number of ranks, for good. A
    stamp unused for STALE_DAYS goes when another is written; reading one keeps it."""
    monkeypatch.setenv("MSCN_CACHE_DIR", str(tmp_path / "stamps"))
    old = time.time() - (checkstamp.STALE_DAYS + 1) * 86400
    checkstamp.stamp(("gone",), "fp-gone", 1)
    checkstamp.stamp(("used",), "fp-used", 1)
    for key in ("gone", "used"):
        os.utime(checkstamp._file((key,)), (old, old))
    assert checkstamp.stamped(("used",), "fp-used")  # a hit: in use
    checkstamp.stamp(("new",), "fp-new", 1)
    assert not checkstamp._file(("gone",)).exists()
    assert checkstamp.stamped(("used",), "fp-used") and checkstamp.stamped(("new",), "fp-new")
