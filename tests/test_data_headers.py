"""mscn/data/headers.py and filecheck.py: a file no DALI decoder takes is named before DALI sees it.

DALI 2.4's CPU decoder segfaulted (status 139, no message) in an evaluation loader whose
batch spanned a text file named .jpg; the loader's check turns that into one line.
"""
import io
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_fixtures import jpeg_segments

from mscn.data.filecheck import first_undecodable
from mscn.data.headers import header_kind

FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP", "PPM": "PNM",
           "JPEG2000": "JPEG 2000"}


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_dali_decodes_is_recognised_by_its_header(fmt):
    if fmt == "JPEG2000" and "JPEG2000" not in Image.SAVE:
        pytest.skip("this Pillow has no JPEG 2000 encoder")
    assert header_kind(_encoded(fmt)[:16]) == FORMATS[fmt]


@pytest.mark.parametrize("head", [b"", b"hello, not an image", b"GIF89a\x08\x00", b"<html>", b"\x00" * 16,
                                  b"RIFF\x00\x00\x00\x00WAVEfmt ", b"P7 WIDTH"])
def test_anything_else_is_not(head):
    assert header_kind(head) is None


def test_the_first_bad_file_of_the_list_is_named_with_why(tmp_path):
    files = []
    for i in range(40):
        (tmp_path / f"{i:02d}.jpg").write_bytes(_encoded("JPEG"))
        files.append(f"{i:02d}.jpg")
    assert first_undecodable(str(tmp_path), files, threads=3, per_task=4) is None
    (tmp_path / "31.jpg").write_bytes(b"hello")
    (tmp_path / "17.jpg").write_bytes(_encoded("GIF", "P"))
    (tmp_path / "25.jpg").write_bytes(b"")
    path, why = first_undecodable(str(tmp_path), files, threads=3, per_task=4)  # 17 is in another task than 25
    assert path == str(tmp_path / "17.jpg") and why == "a GIF image, which DALI cannot decode"
    (tmp_path / "17.jpg").write_bytes(_encoded("PNG"))
    assert first_undecodable(str(tmp_path), files, per_task=4)[1] == "an empty file, which DALI cannot decode"
    (tmp_path / "25.jpg").unlink()
    (tmp_path / "25.jpg").mkdir()
    assert first_undecodable(str(tmp_path), files, per_task=4)[1].startswith("cannot be read (Is a directory")
    (tmp_path / "25.jpg").rmdir()
    (tmp_path / "25.jpg").write_bytes(_encoded("BMP"))
    assert first_undecodable(str(tmp_path), files)[1].startswith("no JPEG, PNG, BMP, TIFF, JPEG 2000, WebP or PNM "
                                                                 "header (it starts with b'hello')")


def test_an_evaluation_loader_names_a_non_image_instead_of_crashing(tmp_path):
    """Batch 64 over 17 files, one of them text. DALI's own answer varies from run to run: its
    decoder's error, or (3 runs of 3 on a probe's set) a segfault, status 139, no message.
    The loader names the file before DALI reads it."""
    from eval_testdata import make_image_folder

    root = make_image_folder(tmp_path / "val", classes=2, per_class=8)
    (root / "c0" / "x.jpg").write_text("hello, this is text")
    code = ("from mscn.config import load_config\n"
            "from mscn.pipelines.loader import build_eval_loader\n"
            f"cfg = load_config('demo', ['data.root={root}'])\n"
            f"for b in build_eval_loader(cfg, '{root}', batch_size=64):\n"
            "    pass\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"DataError: {root / 'c0' / 'x.jpg'}: no JPEG, PNG" in proc.stderr
    assert f"run `mscn data scan {root} --out LIST.txt`" in proc.stderr


def _cut_short(tmp_path, data: bytes):
    from mscn.data.headers import HEAD_BYTES, cut_short

    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, HEAD_BYTES)
        return cut_short(fd, header_kind(head), head, len(data))
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM"])
def test_a_file_with_only_its_signature_or_cut_short_is_named_and_a_whole_one_is_not(tmp_path, fmt):
    """DALI 2.4 segfaults when two undecodable samples meet in one batch (a damaged file
    repeated to pad a shard's last batch is enough), whatever their header says: a file cut
    short, or a signature followed by zeros, is found by its first and last bytes."""
    whole = _encoded(fmt)
    modes = {"JPEG": ("RGB", "L"), "PPM": ("RGB", "L", "1")}.get(fmt, ("RGB", "L", "P"))  # PPM: P6, P5, P4
    for mode in modes:
        assert _cut_short(tmp_path, _encoded(fmt, mode)) is None, mode
    if fmt == "PPM":  # a comment in the header, and 16-bit samples
        pixels = np.arange(6 * 5, dtype=">u2") * 1000
        assert _cut_short(tmp_path, b"P5\n# made by hand\n6 5\n65535\n" + pixels.tobytes()) is None
        assert _cut_short(tmp_path, b"P5\n# made by hand\n6 5\n65535\n" + pixels.tobytes()[:-1]) == \
            "a PNM image cut short (87 of 88 bytes)"
    signature = {"JPEG": 3, "PNG": 8, "BMP": 2, "TIFF": 4, "WEBP": 15, "PPM": 3}[fmt]
    zeros = whole[:signature] + bytes(len(whole))
    if fmt != "PPM":  # zeros after "P6\n" are no header to hold it to: DALI finds it
        assert _cut_short(tmp_path, zeros) is not None
    if fmt != "TIFF":  # a TIFF may keep its directory first: cut at its end, it still points inside
        assert _cut_short(tmp_path, whole[:len(whole) * 2 // 3]) is not None
    if fmt == "WEBP":  # cut inside its image data: cut short, not "no WebP image"
        assert _cut_short(tmp_path, whole[:len(whole) * 2 // 3]).startswith("a WebP cut short")


def test_a_jpeg_with_data_after_its_end_marker_is_whole_and_one_cut_inside_its_header_is_not(tmp_path):
    jpeg = _encoded("JPEG")
    assert _cut_short(tmp_path, jpeg + b"\x00" * 64 + b"a camera's trailer") is None
    png = _encoded("PNG")
    assert _cut_short(tmp_path, png + b"trailing bytes") is None
    for n in (4, 20, 100, jpeg.find(b"\xff\xda") + 4):
        assert _cut_short(tmp_path, jpeg[:n]) == "a JPEG cut short: it ends before its image data does"
    # past the 64 KiB looked at from the end: a long trailer (a motion photo's video) and a cut
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buf, "JPEG",
                                                                                                   quality=95)
    big = buf.getvalue()
    assert len(big) > 2 * 64 * 1024
    assert _cut_short(tmp_path, big + os.urandom(200_000).replace(b"\xff", b"\x00")) is None
    assert _cut_short(tmp_path, big[:len(big) * 2 // 3]) == "a JPEG cut short: it ends before its image data does"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a segfault there is a status, not this test's death)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=240, env=env)


def test_an_evaluation_loader_names_two_files_cut_short_instead_of_crashing(tmp_path):
    """Two JPEGs cut short in a batch of 32: DALI 2.4 segfaulted in 3 runs of 3 (status
    139, one line of its JPEG parser); the loader names the first before DALI reads it. A
    file list gets the same check: a file changed after the scan that wrote it."""
    from eval_testdata import make_image_folder

    root = make_image_folder(tmp_path / "val", classes=2, per_class=12)
    good = (root / "c0" / "000.jpg").read_bytes()
    (root / "c0" / "zz_cut.jpg").write_bytes(good[:100])
    (root / "c1" / "zz_cut.jpg").write_bytes(good[:300])
    code = ("import sys\n"
            "from mscn.config import load_config\n"
            "from mscn.pipelines.loader import build_eval_loader\n"
            f"cfg = load_config('demo', ['data.root={root}'])\n"
            "for b in build_eval_loader(cfg, sys.argv[1], batch_size=32):\n"
            "    pass\n")
    proc = _python(code, str(root))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert (f"DataError: {root / 'c0' / 'zz_cut.jpg'}: a JPEG cut short: it ends before its image data does, "
            "which DALI cannot decode; run `mscn data scan") in proc.stderr, proc.stderr[-2000:]
    # the same images as a list: the check reads the files it names
    listed = tmp_path / "val.txt"
    listed.write_text("".join(f"{p.relative_to(root)} {int(p.parent.name[1:])}\n"
                              for p in sorted(root.rglob("*.jpg")) if p.name != "zz_cut.jpg"))
    (root / "c1" / "005.jpg").write_text("<html>503 Service Unavailable</html>")
    proc = _python(code.replace("sys.argv[1]", f"sys.argv[1], file_list='{listed}'"), str(root))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"DataError: {root / 'c1' / '005.jpg'}: no JPEG, PNG" in proc.stderr, proc.stderr[-2000:]
    assert "replace the file, or rescan and use the new list" in proc.stderr


def test_a_training_loader_names_two_files_cut_short_instead_of_crashing(tmp_path):
    """Two JPEGs cut inside their header in a training set of 102, batch 64: DALI 2.4
    segfaulted (status 139 after "[jpeg_parser] Invalid marker", no message; measured with
    data.check_files=false, which leaves DALI to meet them; batch 32 or 96 raised instead).
    The training loader now reads its share of the files first and names the first."""
    from eval_testdata import make_image_folder

    root = make_image_folder(tmp_path / "train", classes=2, per_class=50)
    good = (root / "c0" / "000.jpg").read_bytes()
    first = root / "c0" / "zz_cut.jpg"
    first.write_bytes(good[:100])
    (root / "c1" / "zz_cut.jpg").write_bytes(good[:100])
    code = ("import sys\n"
            "from mscn.config import load_config\n"
            "from mscn.pipelines.loader import build_train_loader\n"
            "cfg = load_config('demo', [f'data.root={sys.argv[1]}', 'train.global_batch=64', 'data.image_size=32',\n"
            "                           'data.num_threads=1', *(f'views.{i}.mask.grid=8' for i in range(4)),\n"
            "                           *sys.argv[2:]])\n"
            "for b in build_train_loader(cfg, apply_mask=False):\n"
            "    pass\n")
    proc = _python(code, str(root))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert (f"DataError: {first}: a JPEG cut short: it ends before its image data does, which DALI cannot "
            f"decode; run `mscn data scan {root} --out LIST.txt`") in proc.stderr, proc.stderr[-2000:]


def test_the_ranks_split_the_training_files_and_name_the_first_damaged_one_of_the_whole_list(tmp_path):
    """Rank r reads files r, r + W, ...; with a gather every rank names the first damaged file
    of the whole list, without one (a loader built on its own) a rank names its own."""
    from mscn.data.filecheck import check_headers, check_training_files
    from mscn.data.source import Source
    from mscn.errors import DataError

    good = _encoded("JPEG")
    names = [f"{i}.jpg" for i in range(6)]
    for n in names:
        (tmp_path / n).write_bytes(good)
    (tmp_path / "3.jpg").write_bytes(good[:200])  # rank 1's share (1, 3, 5)
    (tmp_path / "4.jpg").write_bytes(b"")  # rank 0's (0, 2, 4)
    source = Source("folder", str(tmp_path), 6, files=tuple(names), labels=(0,) * 6)

    def said(rank, gather=None):
        with pytest.raises(DataError) as e:
            check_training_files(source, rank, 2, gather=gather)
        return str(e.value)

    assert said(0).startswith(f"{tmp_path / '4.jpg'}: an empty file")
    assert said(1).startswith(f"{tmp_path / '3.jpg'}: a JPEG cut short")
    findings = {0: (4, str(tmp_path / "4.jpg"), "an empty file"), 1: (3, str(tmp_path / "3.jpg"), "a JPEG cut short")}
    for rank in (0, 1):  # what all_gather_object hands each rank: its own finding and the other's
        assert said(rank, gather=lambda mine: [mine if r == rank else findings[r] for r in (0, 1)]).startswith(
            f"{tmp_path / '3.jpg'}: ")
    assert said(0).startswith(f"{tmp_path / '4.jpg'}: an empty file")  # a failed check is not remembered
    (tmp_path / "3.jpg").write_bytes(good)
    (tmp_path / "4.jpg").write_bytes(good)
    check_training_files(source, 0, 2, gather=lambda mine: [mine, None])
    # every rank's share passed: the whole set is checked, and read no more (the kNN monitor's
    # evaluation loader over the training set)
    (tmp_path / "0.jpg").write_bytes(b"")
    check_headers(source)
    check_training_files(source, 1, 2)


def test_a_copy_of_a_checked_set_is_checked_again(tmp_path):
    """A process checks a set once (an ablation trains many runs on one set), by its root as
    well as its files: a copy has the same names, hence the same digest, but other bytes."""
    import shutil

    from mscn.data.filecheck import check_headers, check_training_files
    from mscn.data.source import resolve_source
    from mscn.errors import DataError

    (tmp_path / "a" / "c0").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "a" / "c0" / f"{i}.jpg").write_bytes(_encoded("JPEG"))
    check_training_files(resolve_source(str(tmp_path / "a")))  # one rank: the whole set
    (tmp_path / "a" / "c0" / "3.jpg").write_bytes(b"")
    check_headers(resolve_source(str(tmp_path / "a")))  # read once: not again (the kNN monitor's loader)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "c0" / "2.jpg").write_bytes(b"")
    copy = resolve_source(str(tmp_path / "b"))
    assert copy.digest() == resolve_source(str(tmp_path / "a")).digest()
    for check in (check_training_files, check_headers):
        with pytest.raises(DataError, match="2.jpg: an empty file"):
            check(copy)


def test_tar_shards_are_checked_member_by_member_and_named_by_their_original_file(tmp_path):
    """Tar shards hand DALI the same bytes (two damaged members in a batch of 64 crashed it as
    files did): each rank reads its share of the samples' image members through the shards'
    DALI indexes, and the message names the file the sample was packed from."""
    from eval_testdata import make_image_folder

    import shutil

    from mscn.data.filecheck import check_training_files
    from mscn.data.pack import pack
    from mscn.data.source import resolve_source
    from mscn.errors import DataError

    root = make_image_folder(tmp_path / "img", classes=2, per_class=6)
    pack(root, tmp_path / "wds", shard_size=5, progress=False, workers=1)
    source = resolve_source(str(tmp_path / "wds"))
    assert source.kind == "wds" and len(source.tars) == 3
    for rank in (0, 1):
        check_training_files(source, rank, 2)
    # in a copy (a process checks a set once): zeros over the last 60 bytes of the image member
    # of the 2nd sample of the 2nd shard (its 7th in all: rank 0's of 2) and of the 1st of the
    # 3rd (its 11th: rank 0's too)
    shutil.copytree(tmp_path / "wds", tmp_path / "copy")
    tars = sorted((tmp_path / "copy").glob("*.tar"))
    hit = []
    for tar, line in ((tars[1], 2), (tars[2], 1)):
        fields = tar.with_suffix(".idx").read_text().splitlines()[line].split()
        at = next(i for i in range(0, len(fields), 4) if fields[i] == "jpg")
        offset, size, name = int(fields[at + 1]), int(fields[at + 2]), fields[at + 3]
        with open(tar, "r+b") as f:
            f.seek(offset + size - 60)
            f.write(bytes(60))
        hit.append(f"{tar}:{offset}:{name}")
    source = resolve_source(str(tmp_path / "copy"))
    check_training_files(source, 1, 2)  # rank 1's share is sound
    with pytest.raises(DataError) as e:
        check_training_files(source, 0, 2)
    msg = str(e.value)
    assert f"(packed as {hit[0]}): a JPEG cut short: it ends before its image data does" in msg, msg
    original = msg.split(" (packed as ")[0]
    assert Path(original).parent.parent == root and Path(original).is_file(), msg
    assert msg.endswith("run `mscn data scan` on the ImageFolder these shards came from, then `mscn data pack "
                        "<its .filelist.txt> OUT` again"), msg
    with pytest.raises(DataError, match="packed as " + re.escape(hit[0])):  # the first of the whole set
        check_training_files(source, 1, 2, gather=lambda mine: [(10, hit[1], "x"), mine, (6, hit[0], "y")])


def test_a_bigtiff_is_an_image_and_a_jpeg_signature_followed_by_no_marker_is_not(tmp_path):
    """BigTIFF (II+ / MM+, 8-byte offsets) is decoded by DALI and kept by the scan: it must pass.
    A JPEG's signature must be followed by a marker; text after it is no JPEG, even when the
    file ends with the end-of-image marker (which the 2-byte fast path trusts)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    img.save(tmp_path / "big.tif", "TIFF", big_tiff=True)
    assert (tmp_path / "big.tif").read_bytes()[:4] == b"II+\x00"
    assert first_undecodable(str(tmp_path), ["big.tif"]) is None
    raw = bytearray((tmp_path / "big.tif").read_bytes())
    raw[8:16] = (len(raw) + 100).to_bytes(8, "little")  # its first directory past the end
    (tmp_path / "bad.tif").write_bytes(bytes(raw))
    assert first_undecodable(str(tmp_path), ["bad.tif"])[1].startswith("a TIFF whose first image directory")
    (tmp_path / "text.jpg").write_bytes(b"\xff\xd8\xff not a JPEG \xff\xd9")
    assert first_undecodable(str(tmp_path), ["text.jpg"])[1] == ("a JPEG signature without a JPEG marker after it, "
                                                                 "which DALI cannot decode")


def test_a_jpeg_cut_short_past_64_kib_is_not_taken_whole_for_its_thumbnail(tmp_path):
    """A photo cut just past 64 KiB: the last 64 KiB hold no end marker of the image, but may
    hold its EXIF thumbnail's (in the APP1 segment at its start). That one does not count."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buf, "JPEG",
                                                                                                   quality=95)
    photo = buf.getvalue()
    thumb = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(thumb, "JPEG")
    payload = b"Exif\x00\x00" + b"\x00" * 20_000 + thumb.getvalue()  # the thumbnail ends ~20 KB in
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    whole = photo[:2] + app1 + photo[2:]
    assert len(whole) > 2 * 64 * 1024
    (tmp_path / "whole.jpg").write_bytes(whole)
    (tmp_path / "cut.jpg").write_bytes(whole[:70_000])  # the thumbnail's end marker is in its last 64 KiB
    assert first_undecodable(str(tmp_path), ["whole.jpg"]) is None
    assert first_undecodable(str(tmp_path), ["cut.jpg"])[1] == ("a JPEG cut short: it ends before its image data "
                                                                "does, which DALI cannot decode")


def test_a_rank_whose_check_fails_still_takes_part_in_the_gather(tmp_path, monkeypatch):
    """A rank that raised alone would leave the others waiting in all_gather_object (gloo:
    "Connection closed by peer"; NCCL: until its timeout): with a gather, its failure is a
    finding like a damaged file, so every rank stops with the same line. Without one, the
    error is the caller's."""
    import mscn.data.filecheck as filecheck
    from mscn.data.source import Source
    from mscn.errors import DataError

    def broken(*_):
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(filecheck, "_first_bad_in", broken)
    source = Source("folder", str(tmp_path), 2, files=("a.jpg", "b.jpg"), labels=(0, 0))
    sent = []
    with pytest.raises(DataError, match=r"the check of rank 1's share failed \(OverflowError: Python int"):
        filecheck.check_training_files(source, 1, 2, gather=lambda mine: sent.append(mine) or [None, mine])
    assert sent and sent[0][0] == -1
    with pytest.raises(OverflowError):
        filecheck.check_training_files(source, 1, 2)


def test_a_jpeg_header_is_walked_to_its_scan_as_dalis_parser_reads_it(tmp_path):
    """DALI's JPEG parser walks the header before decoding and fails ("Invalid marker") where
    libjpeg only warns; two such files in a batch segfaulted DALI (a header overwritten with
    zeros, its first bytes and end marker intact: a probe's file, 2 runs of 2). The check
    walks the header too, so a file whose end looks right is still named."""
    good = _encoded("JPEG")
    segs = dict((m, i) for i, m in jpeg_segments(good))
    scan, frame = segs[0xDA], segs[0xC0]
    cases = {
        "zeroed.jpg": good[:20] + bytes(scan - 20) + good[scan:],  # APP0 kept, the rest of the header zeros
        "junk.jpg": good[:frame] + b"junkjunk" + good[frame:],  # DALI: "Invalid marker" (measured)
        "no_frame.jpg": good[:frame] + good[frame + 2 + int.from_bytes(good[frame + 2:frame + 4], "big"):],
        "cut_header.jpg": good[:100] + b"\xff\xd9",
        "bad_marker.jpg": good[:frame] + b"\xff\x20" + good[frame:],
        "zero_length.jpg": good[:frame + 2] + b"\x00\x01" + good[frame + 4:],
    }
    for name, data in cases.items():
        assert data.endswith(b"\xff\xd9")
        (tmp_path / name).write_bytes(data)
    said = {name: first_undecodable(str(tmp_path), [name])[1].removesuffix(", which DALI cannot decode")
            for name in cases}
    assert said == {
        "zeroed.jpg": "a JPEG whose header is damaged: no marker at byte 20",
        "junk.jpg": f"a JPEG whose header is damaged: no marker at byte {frame}",
        "no_frame.jpg": "a JPEG whose header is damaged: no frame header (SOF) before its image data",
        "cut_header.jpg": "a JPEG cut short: it ends before its image data does",
        "bad_marker.jpg": f"a JPEG whose header is damaged: an invalid marker (0xFF20) at byte {frame}",
        "zero_length.jpg": f"a JPEG whose header is damaged: a segment of length 1 at byte {frame}",
    }, said
    # fill bytes before a marker are allowed (DALI decodes them), and so is every SOF kind
    (tmp_path / "fill.jpg").write_bytes(good[:frame] + b"\xff\xff" + good[frame:])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
        buf, "JPEG", progressive=True)
    (tmp_path / "progressive.jpg").write_bytes(buf.getvalue())
    assert 0xC2 in dict((m, i) for i, m in jpeg_segments(buf.getvalue()))
    assert first_undecodable(str(tmp_path), ["fill.jpg", "progressive.jpg"]) is None


def test_a_thumbnail_far_into_the_header_does_not_stand_for_the_image_end(tmp_path):
    """A photo with 130 KB of XMP, then a Photoshop segment holding a thumbnail, cut 20 KB into
    its image data: the thumbnail's end marker lies in the last 64 KiB and past the first two
    segments (a probe's file). An end marker counts only after the scan starts."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    photo = buf.getvalue()
    thumb = io.BytesIO()
    Image.new("RGB", (16, 16), (20, 90, 200)).save(thumb, "JPEG")
    xmp = b"".join(b"\xff\xe1" + (65533 + 2).to_bytes(2, "big") + b"x" * 65533 for _ in range(2))
    ps = b"Photoshop 3.0\x00" + thumb.getvalue()
    app13 = b"\xff\xed" + (len(ps) + 2).to_bytes(2, "big") + ps
    whole = photo[:2] + xmp + app13 + photo[2:]
    scan = dict((m, i) for i, m in jpeg_segments(whole))[0xDA]
    (tmp_path / "cut.jpg").write_bytes(whole[:scan + 20_000])
    (tmp_path / "whole.jpg").write_bytes(whole)
    assert first_undecodable(str(tmp_path), ["whole.jpg"]) is None
    assert first_undecodable(str(tmp_path), ["cut.jpg"])[1].startswith("a JPEG cut short")
