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
