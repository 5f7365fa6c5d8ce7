"""mscn/data/headers.py: a file no DALI decoder takes is named before DALI sees it.

DALI 2.4's CPU decoder segfaulted (status 139, no message) in an evaluation loader whose
batch spanned a text file named .jpg; the loader's check turns that into one line.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mscn.data.headers import first_undecodable, header_kind

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


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP"])
def test_a_file_with_only_its_signature_or_cut_short_is_named_and_a_whole_one_is_not(tmp_path, fmt):
    """DALI 2.4 segfaults when two undecodable samples meet in one batch (a damaged file
    repeated to pad a shard's last batch is enough), whatever their header says: a file cut
    short, or a signature followed by zeros, is found by its first and last bytes."""
    whole = _encoded(fmt)
    for mode in ("RGB", "L", "P") if fmt != "JPEG" else ("RGB", "L"):
        assert _cut_short(tmp_path, _encoded(fmt, mode)) is None, mode
    signature = {"JPEG": 3, "PNG": 8, "BMP": 2, "TIFF": 4, "WEBP": 15}[fmt]
    zeros = whole[:signature] + bytes(len(whole))
    assert _cut_short(tmp_path, zeros) is not None
    if fmt != "TIFF":  # a TIFF may keep its directory first: cut at its end, it still points inside
        assert _cut_short(tmp_path, whole[:len(whole) * 2 // 3]) is not None


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
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert (f"DataError: {root / 'c0' / 'zz_cut.jpg'}: a JPEG cut short: it ends before its image data does, "
            "which DALI cannot decode; run `mscn data scan") in proc.stderr, proc.stderr[-2000:]
    # the same images as a list: the check reads the files it names
    listed = tmp_path / "val.txt"
    listed.write_text("".join(f"{p.relative_to(root)} {int(p.parent.name[1:])}\n"
                              for p in sorted(root.rglob("*.jpg")) if p.name != "zz_cut.jpg"))
    (root / "c1" / "005.jpg").write_text("<html>503 Service Unavailable</html>")
    proc = subprocess.run([sys.executable, "-c", code.replace("sys.argv[1]", f"sys.argv[1], file_list='{listed}'"),
                           str(root)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"DataError: {root / 'c1' / '005.jpg'}: no JPEG, PNG" in proc.stderr, proc.stderr[-2000:]
    assert "replace the file, or rescan and use the new list" in proc.stderr
