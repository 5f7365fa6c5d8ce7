"""`mscn data scan`: decode every image once, before a run, and write a clean file list.

One corrupt JPEG in a 1.28M-image ImageNet copy stops a DALI pipeline hours into
pretraining. Scanning decodes each file fully with PIL (``img.load()``) over all
cores, excludes the files no decoder can use (zero-byte, non-image, corrupt,
truncated, or a format DALI has no decoder for, such as a GIF named .jpg) and writes
the rest as a DALI ``file_list`` (``relpath label``, labels in sorted class order like
torchvision's ImageFolder). Files DALI decodes
to RGB anyway (CMYK, grayscale, PNG and other non-JPEG formats) are kept and only
reported, and so are small images (short side < 32 px: ``small``), since the
pipeline's random-resized crop upsamples them; ``min_size`` excludes images below
it on purpose (``tiny``). The dataset itself is never written to.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from mscn.data.headers import jpeg_ends
from mscn.data.imagefolder import (DALI_FORMATS, SPLIT_NAMES, UNLABELLED, entries, hidden, is_file, is_flat_folder,
                                   is_image_name, list_image_folder, not_utf8, parallel_imap)
from mscn.errors import DataError
from mscn.paths import not_creatable, write_atomic

EXCLUDED = ("zero_byte", "non_image", "corrupt", "truncated", "no_dali_decoder", "tiny", "ignored", "bad_name",
            "unreadable")
KEPT = ("small", "cmyk", "grayscale", "non_jpeg", "warning", "huge")
SMALL_SIDE = 32  # px: reported as "small" below this short side (kept unless min_size excludes it)
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # a header we recognise -> "corrupt", not "non_image"
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "F"}


def _is_gray_palette(img: Image.Image) -> bool:
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


@contextlib.contextmanager
def _png_text_limits():
    """PIL refuses a PNG whose text or ICC chunk inflates past 1 MiB (a generator's prompt
    in zTXt, a large profile) as "Decompressed data too large": no damage, and DALI decodes
    the pixels. The scan raises the limits to 64 MiB a chunk while it reads one file."""
    saved = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
    PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = 64 * 2**20, 256 * 2**20
    try:
        yield
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = saved


def _header_only(data: bytes) -> Image.Image | None:
    """The image of ``data`` opened without PIL's decompression-bomb check (header only, no
    pixels decoded); None when even that fails."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the scan's own process (or worker): no other thread opens images here
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any failure: the caller reports the bomb error as it was
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_image(path: str, min_size: int) -> tuple[list[tuple[str, str]], str | None]:
    """``([(reason, detail), ...], format)`` for one file; no issues -> ``[]``."""
    if not is_image_name(path):
        return [("ignored", "no image extension (ImageFolder and DALI skip it)")], None
    if "\n" in path or "\r" in path:  # one line per file: the list would split it in two
        return [("bad_name", "a line break in its name, which a file list cannot hold; rename it")], None
    if not_utf8(path):  # a Latin-1 name: the list is UTF-8, and DALI takes names as UTF-8 strings
        return [("bad_name", "a name that is not valid UTF-8, which a file list cannot hold; rename it")], None
    try:
        with open(path, "rb") as f:  # read once: PIL decodes these bytes, the JPEG end check walks them
            data = f.read()
    except OSError as e:  # one file the scan may not read (permissions, an I/O error) is one line of the report
        return [("unreadable", f"cannot be read: {e.strerror or e}")], None
    if not data:
        return [("zero_byte", "empty file")], None
    issues = []
    with warnings.catch_warnings(record=True) as caught, _png_text_limits():
        warnings.simplefilter("always")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # full decode: Image.open alone reads only the header
        except UnidentifiedImageError:
            if any(data.startswith(m) for m in _MAGIC):
                return [("corrupt", "image header is unreadable")], None
            return [("non_image", "PIL cannot identify it as an image")], None
        except Image.DecompressionBombError as e:
            # a panorama, not damage: PIL refuses to decode more than 2 x MAX_IMAGE_PIXELS
            # (179 MP), DALI decodes it. Kept on the evidence the scan can afford: its header
            img = _header_only(data)
            if img is None:
                return [("corrupt", str(e))], None
            w, h = img.size
            issues.append(("huge", f"{w}x{h} ({w * h / 1e6:.0f} MP): above PIL's decompression-bomb limit, so the "
                                   "scan read its header (and a JPEG's markers), not its pixels; DALI decodes it"))
        except (OSError, SyntaxError, ValueError) as e:
            reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
            return [(reason, str(e))], None
        fmt, mode, (w, h) = img.format, img.mode, img.size
        if fmt not in DALI_FORMATS:
            return [("no_dali_decoder", f"a {fmt} image: DALI cannot decode it (convert it to JPEG or PNG)")], fmt
        gray = mode in _GRAY_MODES or (mode in ("P", "PA") and _is_gray_palette(img))
        if fmt == "JPEG" and not jpeg_ends(data):
            return [("truncated", "no end-of-image marker after the image data: an incomplete file (a "
                                  "download cut short, or its end overwritten with zeros); decoders fill the "
                                  "missing part with gray without an error")], fmt
    if min(w, h) < min_size:
        issues.append(("tiny", f"{w}x{h}, short side < {min_size} (--min-size)"))
    elif min(w, h) < SMALL_SIDE:
        issues.append(("small", f"{w}x{h}, short side < {SMALL_SIDE} (kept: the crops upsample it)"))
    if mode == "CMYK":
        issues.append(("cmyk", "CMYK (DALI decodes it to RGB)"))
    elif gray:
        issues.append(("grayscale", f"mode {mode} (DALI decodes it to RGB)"))
    if fmt != "JPEG":
        issues.append(("non_jpeg", f"{fmt} (DALI decodes it on the CPU)"))
    issues += [("warning", str(w.message)) for w in caught]
    return issues, fmt


def _check_task(task):
    abs_path, rel, label, min_size = task
    issues, fmt = check_image(abs_path, min_size)
    return rel, label, issues, fmt


def default_outputs(root) -> tuple[Path, Path]:
    """``./<name>.filelist.txt`` and ``./<name>.scan.json`` in the working directory.

    ``<name>`` is the root's folder name, prefixed by its parent's for split folders
    (``imagenet/train`` -> ``imagenet_train``), so the dataset is never written to.
    """
    root = Path(root).resolve()
    name = f"{root.parent.name}_{root.name}" if root.name in SPLIT_NAMES else root.name
    return Path.cwd() / f"{name}.filelist.txt", Path.cwd() / f"{name}.scan.json"


def report_path_for(list_path) -> Path:
    """The scan report beside a file list: ``X.filelist.txt`` or ``X.txt`` -> ``X.scan.json``.

    The readers find a list's dataset root through this report (``"root"``), so
    ``mscn data scan --out`` puts its report where they will look."""
    list_path = Path(list_path)
    name = list_path.name
    stem = name[: -len(".filelist.txt")] if name.endswith(".filelist.txt") else list_path.stem
    return list_path.with_name(stem + ".scan.json")


def check_outside(path, root: Path) -> None:
    if path and Path(path).resolve().is_relative_to(root.resolve()):
        raise DataError(f"{path}: is inside the dataset {root}; the data tools never write there, pick another path")


def check_not_foreign(out, report) -> None:
    """The list ``out`` and the ``report`` are replaced only if they are an earlier scan's
    output: the report (given, or the one beside the list) names a dataset root. Another
    file there (a list of one's own, notes) is refused rather than overwritten."""
    path = next((p for p in (out, report) if p and Path(p).is_file()), None)
    if path is None:
        return
    earlier = report if report else report_path_for(out) if out else None
    try:
        ours = earlier is not None and "root" in json.loads(Path(earlier).read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise DataError(f"{path}: a file is already there that this scan did not write (no scan report "
                        f"{earlier} beside it); pass another --out/--report, or move it away")


def _write_atomic(path: Path, text: str, root: Path) -> None:
    check_outside(path, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)  # a crash leaves the old file, never half a list
    except OSError as e:  # a full disk: one line, and no empty .tmp left beside the old file
        raise DataError(f"{path}: cannot write it ({e.strerror}); free space or pick another place, then rerun") from None


def write_file_list(path, samples: list[tuple[str, int]], root) -> Path:
    """Write ``relpath label`` lines (DALI ``file_list`` format, paths relative to ``root``,
    which the file must not be inside), or bare ``relpath`` lines when no sample has a label
    (a flat folder: :func:`read_file_list` reads them as unlabelled); returns ``path``.
    Atomic: a crash leaves the old file."""
    if all(label == UNLABELLED for _, label in samples):
        text = "".join(f"{rel}\n" for rel, _ in samples)
    else:
        text = "".join(f"{rel} {label}\n" for rel, label in samples)
    _write_atomic(Path(path), text, Path(root))
    return Path(path)


def _flat_files(root: Path) -> list[tuple[str, int]]:
    """Every visible file directly in a flat folder, unlabelled; not only the image names,
    so that the scan reports what is not an image."""
    return [(e.name, UNLABELLED) for e in sorted(entries(root), key=lambda e: e.name)
            if is_file(e) and not hidden(e.name)]


def scan(root, out=None, report=None, min_size: int = 0, workers: int | None = None,
         progress: bool = True) -> dict:
    """Decode every file under the ImageFolder ``root`` (or directly in a flat folder of
    unlabelled images: no classes, a list of bare paths); return (and write) the report.

    ``out``: where to write the clean file list (not written if None; the CLI
    defaults to :func:`default_outputs`). ``report``: where to write the JSON report.
    The report holds the classes, per-reason counts, per-format counts and every
    file with an issue (``excluded`` says whether it left the list).
    """
    root = Path(root)
    if is_flat_folder(root):  # most SSL data has no labels: scanned all the same
        classes, samples = [], _flat_files(root)
    else:
        classes, samples = list_image_folder(root, images_only=False)
    check_outside(out, root)  # before the long decode, not after
    check_outside(report, root)
    check_not_foreign(out, report)
    for flag, path in (("--out", out), ("--report", report)):  # a folder, or no place to write: now, not after
        why = path and not_creatable(path)
        if why:
            raise DataError(f"{flag} {path}: {why}; it takes the file to write")
    if min_size < 0:
        raise DataError(f"--min-size {min_size}: must be >= 0 pixels")
    tasks = [(str(root / rel), rel, label, min_size) for rel, label in samples]
    started = time.time()  # a file unchanged since then is as the scan decoded it (mscn data pack trusts it)
    results = sorted(parallel_imap(_check_task, tasks, workers, f"scan {root}", progress), key=lambda r: r[0])

    counts, formats, issues, clean = Counter(), Counter(), [], []
    for rel, label, found, fmt in results:
        formats[fmt or "none"] += 1
        reasons = [r for r, _ in found]
        excluded = any(r in EXCLUDED for r in reasons)
        counts.update(reasons or ["ok"])
        if not excluded:
            clean.append((rel, label))
        for reason, detail in found:
            issues.append({"path": rel, "reason": reason, "detail": detail, "excluded": excluded})
    held = {classes[label] for _, label in clean if label != UNLABELLED}
    summary = {
        "root": str(Path(root).resolve()), "file_list": str(out) if out else None, "classes": classes,
        # a class folder without a usable image still takes a label (torchvision refuses it): said
        "empty_classes": [c for c in classes if c not in held],
        "num_files": len(results), "num_kept": len(clean), "num_excluded": len(results) - len(clean),
        "scanned_at": round(started, 3), "min_size": min_size,
        "counts": {k: counts.get(k, 0) for k in ("ok",) + EXCLUDED + KEPT},
        "formats": dict(formats), "issues": issues,
    }
    if report:  # also when nothing is usable: the report says why, file by file
        _write_atomic(Path(report), json.dumps(summary, indent=1) + "\n", root)
    if not clean:
        raise DataError(f"{root}: none of its {len(results)} files is a usable image"
                        + (f"; see the scan report {report}" if report else ""))
    if out:
        write_file_list(out, clean, root)
    return summary


def is_label(text: str) -> bool:
    """A class label: ASCII digits (``str.isdigit`` also takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()


class _FilesUnder:
    """``present(rel)``: whether ``root/rel`` is a file, from one listing per folder.

    A list of ImageNet's 1.28 M files names 1,000 folders: reading each once costs a small
    part of a ``stat`` per entry (~13 s here; minutes on a cluster's network file system,
    where every rank of every node starts the same way). A symlink is followed, as DALI
    reads it; the answer is always a ``stat``'s."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.listed: dict[str, frozenset[str]] = {}

    def __call__(self, rel: str) -> bool:
        folder, name = os.path.split(rel)
        names = self.listed.get(folder)
        if names is None:
            try:
                with os.scandir(os.path.join(self.root, folder)) as it:
                    names = frozenset(e.name for e in it if is_file(e))
            except OSError:  # no such folder, not a folder, not listable (a stat may still work)
                names = frozenset()
            self.listed[folder] = names
        # a name not listed is looked up on its own: the answer stays the stat's (a folder that
        # may be entered but not listed, a case-insensitive file system), at no cost when all are there
        return name in names or os.path.isfile(os.path.join(self.root, rel))


def _not_a_file(where: str) -> str:
    """What a listed path that is no readable file is, for the message: ``missing file``, or
    what stands there instead (a folder, a dangling symlink, a FIFO or device). ``where`` as
    listed (a path object would drop a trailing slash)."""
    if os.path.isdir(where):
        return "a folder, not an image file:"
    if os.path.islink(where) and not os.path.exists(where):
        return "a dangling symlink, not an image file:"
    if os.path.exists(where):
        return "not a regular file (a FIFO, a socket or a device):"
    return "missing file"


def read_file_list(path, root, root_note: str | None = None) -> list[tuple[str, int]]:
    """Parse and validate a ``relpath label`` file list against ``root``; a list of bare
    ``relpath`` lines is unlabelled (label -1 for every file). ``root_note``: why ``root``
    is where the entries were looked for, given as the fix when they are missing (the
    caller guessed the root: no scan report beside the list).

    Any problem is one DataError naming the list, the line and the file: a missing
    list, a malformed line, or entries whose image is not under ``root``.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DataError(f"{path}: file list not found; write one with `mscn data scan ROOT --out {path}`")
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (the root the file list {path} is relative to, from its scan "
                        f"report {report_path_for(path).name} or as given); if the dataset moved, set 'root' in that "
                        "report to its new place, or rescan it")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is not part of the first path
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (byte {e.start}); a file list is 'relative/path label' "
                        "lines, as `mscn data scan` writes it") from None
    samples, missing, labelled = [], [], None
    present = _FilesUnder(root)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # paths may hold spaces, labels cannot
        if labelled is None:  # the first line decides: 'relpath label' lines, or bare relpaths (unlabelled)
            labelled = len(parts) == 2 and is_label(parts[1])
        if not labelled:
            rel, label = line.rstrip(), -1  # a name may start with a space (the scan writes it so)
        elif len(parts) != 2 or not is_label(parts[1]):
            raise DataError(f"{path}:{lineno}: expected 'relative/path label' like line 1 (a label is a class "
                            f"number, an integer >= 0), got {line!r}")
        else:
            rel, label = parts[0], int(parts[1])
        if rel != rel.lstrip() and not present(rel) and present(rel.lstrip()):
            rel = rel.lstrip()  # an indented line of a list written by hand
        if not present(rel):
            missing.append((lineno, rel))
        samples.append((rel, label))
    if missing:
        lineno, rel = missing[0]
        more = ""
        if len(missing) > 1:
            rest = ", ".join(r for _, r in missing[1:4]) + (", ..." if len(missing) > 4 else "")
            more = f" and {len(missing) - 1} more of {len(samples)} entries ({rest})"
        fix = root_note or f"rescan with `mscn data scan {root}`"
        head = rel.rsplit(maxsplit=1)
        if rel.startswith("#"):  # the first line decided "unlabelled", and it is no file either
            fix = "a file list has no comment lines: delete it"
        elif len(head) == 2 and present(head[0]):  # 'path zero', 'path -1': a file, and no class number
            fix = (f"it reads as the file {head[0]} with the label {head[1]!r}, which is not a class number (an "
                   "integer >= 0)")
        raise DataError(f"{path}:{lineno}: {_not_a_file(os.path.join(root, rel))} {root / rel}{more}; {fix}")
    if not samples:
        raise DataError(f"{path}: empty file list; write one with `mscn data scan {root}`")
    return samples
