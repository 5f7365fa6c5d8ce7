"""Crash-safe checkpoints: atomic writes, the last K kept, the newest *valid* one found.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced,
then renamed over its final name (``os.replace`` is atomic on POSIX), and the directory
is fsynced: a crash leaves either the old set of files or the new one, never a
half-written ``ckpt_*.pt``. :func:`find_latest_valid` still tries each file newest first
and skips any that fail to load (disk full, a copy cut short by hand).

Everything is read back with ``torch.load(weights_only=True)``, so a checkpoint holds only
tensors and plain containers: the config as a plain dict, RNG states as tensors.
Keys: ``model`` (the whole method, BYOL target included), ``optimizer``, ``scaler``,
``step`` (optimizer steps done), ``epoch``, ``step_in_epoch``, ``rng`` (rank 0's),
``ranks`` (per rank: DALI/mask, RNG and meter state; train/resume.py), ``world_size``,
``config``, ``arch``, ``method`` and ``backbone`` (the encoder alone, torchvision key names; the
evaluation suite reads ``backbone``, ``arch`` and ``config``).
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from mscn.errors import MscnError

_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")
_REQUIRED = ("model", "optimizer", "step", "config", "arch", "method", "backbone")
BACKBONE_KEYS = ("backbone", "arch", "config")  # what evaluation reads


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def ckpt_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt_{step:08d}.pt"


def atomic_save(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that ``path`` is either absent/old or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            # a second Ctrl-C inside torch.save: its zip writer then fails to close ("unexpected
            # pos"), hiding the interrupt; the earlier checkpoints are intact, the partial file goes
            raise KeyboardInterrupt from None
        # a full disk reaches here as an OSError (flush, fsync) or as torch's RuntimeError from
        # its zip writer ("unexpected pos ...", "PytorchStreamWriter failed writing") with the
        # OSError as its context
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is None or cause.errno not in _DISK_ERRNOS:
            raise
        tmp.unlink(missing_ok=True)  # before measuring: the partial file's space is free again
        before = ("the checkpoints written before are untouched" if list_checkpoints(path.parent)
                  else "no checkpoint of this run was written before")
        if cause.errno not in (errno.ENOSPC, errno.EDQUOT):  # read-only, no permission, I/O error
            raise MscnError(f"cannot write {path}: {cause.strerror or cause}; {before}: make "
                            f"{path.parent} writable and resume") from None
        free = shutil.disk_usage(path.parent).free / 2**30
        size = _state_bytes(state) / 2**30
        raise MscnError(f"cannot write {path}: {cause.strerror or cause} ({free:.2f} GiB free there, about "
                        f"{size:.2f} GiB needed); {before}: free some space and resume") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # ... and the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def _state_bytes(state) -> int:
    """The tensor bytes in a checkpoint's state: about the size of its file. Each storage
    counts once, as torch.save writes it once: the ``backbone`` entry shares the ``model``
    entry's tensors (counted twice, a ResNet-50's needs read 0.1 GiB high)."""
    storages: dict[int, int] = {}

    def walk(v) -> None:
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    return sum(storages.values())


def link_or_save(existing: str | Path, state: dict, path: str | Path) -> Path:
    """``path`` as a hard link to the just-written checkpoint ``existing`` (no second copy
    on disk: final.pt used to double a run's checkpoint space), else an atomic save of
    ``state``. Rotation later unlinks only the ``ckpt_*.pt`` name; the data stays."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.link(existing, tmp)
        os.replace(tmp, path)  # atomic, as in atomic_save
    except OSError:  # a filesystem without hard links
        tmp.unlink(missing_ok=True)
        return atomic_save(state, path)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """``ckpt_*.pt`` files in step order, oldest first (temporary files never match)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, ckpt_dir: str | Path, keep_last: int) -> Path:
    """Atomically write ``ckpt_{step:08d}.pt``, then delete all but the newest ``keep_last``
    up to its step. A file named for a later step is never counted or deleted: it can only
    be one that a resume could not read (set aside since, :func:`find_latest_valid`), and
    counting it deleted the checkpoint just written and the good ones before it."""
    step = int(state["step"])
    path = atomic_save(state, ckpt_path(ckpt_dir, step))
    upto = [p for p in list_checkpoints(ckpt_dir) if step_of(p) <= step]  # ``path`` last (keep_last >= 1)
    for old in upto[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in Path(ckpt_dir).glob(".ckpt_*.pt.tmp*"):  # left by a killed writer
        if not stale.name.endswith(f".tmp{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return path


def not_a_checkpoint(path: str | Path) -> str | None:
    """What a file that torch could not load is, from its first bytes, when that says more
    than torch's error (``KeyError: 101`` for a text file, a paragraph for a cut zip); None
    to keep torch's. torch.save writes a zip archive; torch's older format is a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65557))  # the zip index sits at the end, after up to 64 KiB of comment
            tail = f.read()
    except OSError:
        return None
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        if b"PK\x05\x06" not in tail:
            return f"a zip archive cut short ({size} bytes, no index at its end): copied or written incompletely"
        return None
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, or something else pickled
        return None
    return "not a torch checkpoint: it does not start as a zip archive or a pickle"


def _torch_load(path: str | Path, **kwargs):
    """``torch.load(weights_only=True)`` on CPU; torch's warnings are shown only when the file
    loads. A file that fails gets one line from the caller, and torch's warning first (a
    pickle of another protocol: "Detected pickle protocol 4 ... please file an issue") would
    print its advice and a source line above it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state


def opens(path: str | Path) -> bool:
    """Whether ``path`` opens as an mscn checkpoint with every key a resume reads and passes
    its checksums (:func:`damaged_member`): what a resume would take. Opened through a memory
    map, no tensor copied; the checksums read the file once."""
    try:
        state = _torch_load(path, mmap=True)
        if not (isinstance(state, dict) and all(k in state for k in _REQUIRED)):
            return False
        return damaged_member(path) is None
    except Exception:
        return False


# errors of reading a file, not of what it holds (zipfile raises EINVAL on a cut archive)
READ_ERRNOS = frozenset({errno.EIO, errno.EACCES, errno.EPERM, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN,
                         errno.EHOSTDOWN, errno.EAGAIN})


class UnreadableCheckpoint(MscnError):
    """The file could not be read (an I/O error, a permission, a stale network handle): it
    may be sound, so a resume passes over it without setting it aside."""


def damaged_member(path: str | Path) -> str | None:
    """The first member of a checkpoint's zip archive whose bytes fail the CRC-32 that
    torch.save wrote beside them; None when all pass or the file is no zip (torch.load then
    says what it is). torch.load does not verify them: a checkpoint with bytes flipped inside
    a tensor (a disk or a copy that went wrong) loaded, and a run resumed from garbage
    weights. One more read of the file: 7 ms for 16 MB from the page cache."""
    try:
        with zipfile.ZipFile(path) as z:
            if all(i.CRC == 0 for i in z.infolist() if i.file_size):
                return None  # saved with torch's compute_crc32=False: it wrote zeros, no checksums
            return z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        return None
    except OSError as e:
        if e.errno not in READ_ERRNOS:  # a malformed archive (EINVAL, or zipfile's own): torch.load names it
            return None
        raise


def load_checkpoint(path: str | Path, required: tuple[str, ...] = _REQUIRED,
                    not_found: str = "use --resume auto, a ckpt_*.pt path, or none") -> dict:
    """``torch.load(weights_only=True)`` on CPU, after checking the archive's checksums; an
    unreadable, damaged or foreign file is an MscnError.

    ``required``: the keys the caller reads (resume: all of them; evaluation:
    :data:`BACKBONE_KEYS`). ``not_found``: the fix to print when the file is missing.
    """
    try:
        bad = damaged_member(path)  # a missing file: None, and torch.load below names it
    except OSError as e:
        raise UnreadableCheckpoint(f"{path}: cannot be read ({e.strerror or e})") from None
    if bad:
        raise MscnError(f"{path}: not a readable checkpoint (damaged: {bad} fails its checksum; the file changed "
                        "after it was written)")
    try:
        state = _torch_load(path)
    except FileNotFoundError:
        raise MscnError(f"checkpoint not found: {path} ({not_found})") from None
    except Exception as e:  # truncated zip, pickle of a forbidden type...
        if isinstance(e, OSError) and e.errno in READ_ERRNOS:  # the reading failed, maybe for now
            raise UnreadableCheckpoint(f"{path}: cannot be read ({e.strerror or e})") from None
        what = not_a_checkpoint(path)
        if what:
            raise MscnError(f"{path}: not a readable checkpoint ({what})") from None
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, whole
        if "Weights only load failed" in detail:
            # torch's advice here (weights_only=False) would run whatever code the file holds:
            # keep only what it found, and say what the file is not
            found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", detail)
            detail = (found.group(1).strip() if found else "not a torch checkpoint") + \
                "; not a file mscn pretrain wrote (mscn never loads a checkpoint with weights_only=False)"
        raise MscnError(f"{path}: not a readable checkpoint ({type(e).__name__}: {detail})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise MscnError(f"{path}: not an mscn pretraining checkpoint (missing {', '.join(missing)}); "
                        "expected a file written by mscn pretrain")
    return state


def step_of(path: str | Path) -> int | None:
    """The optimizer step a checkpoint file was written at, cheaply: from its name
    (``ckpt_00000054.pt``), else its ``step`` read through a memory map (no tensor is
    copied); None when the file does not say (an exported or hand-made file)."""
    m = _NAME.match(Path(path).name)
    if m:
        return int(m.group(1))
    try:
        state = _torch_load(path, mmap=True)
    except Exception:  # unreadable: whoever loads it next says why, in one line
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def pick_pretrained(path: str | Path) -> tuple[Path, int | None, str | None, dict]:
    """The file that evaluating ``path`` means, its step, a note when a run directory's
    newest weights are not its ``final.pt``, and its state (loaded once, with
    :data:`BACKBONE_KEYS`: a run still training may rotate the file away after this).

    A file is itself. A run directory means its newest weights: ``final.pt``, unless a
    valid ``checkpoints/ckpt_*.pt`` is further on (a run resumed past its first end and
    stopped early writes checkpoints after its final.pt); a folder of ``ckpt_*.pt`` means
    its newest valid one."""
    p = Path(path)
    if not p.is_dir():
        if not p.is_file():  # also a directory name with a typo: say what to pass
            raise MscnError(f"checkpoint not found: {path} (pass a file written by mscn pretrain, a run "
                            "directory, or 'random')")
        return p, step_of(p), None, load_checkpoint(p, BACKBONE_KEYS)
    final = p / "final.pt" if (p / "final.pt").is_file() else None
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    final_step = step_of(final) if final else None
    names = list_checkpoints(ckpt_dir)
    if final is not None and (final_step is None or not names or step_of(names[-1]) <= final_step):
        try:
            return final, final_step, None, load_checkpoint(final, BACKBONE_KEYS)  # nothing named past final.pt
        except MscnError as e:
            # a damaged final.pt (a copy cut short; not the hard link to a checkpoint): the
            # checkpoint it was linked from, or the newest that loads, holds the weights too
            found = find_latest_valid(ckpt_dir, BACKBONE_KEYS) if names else None
            if found is None:
                raise
            step = step_of(found[0])
            return found[0], step, f"{e}: evaluating {found[0]} (step {step}) instead", found[1]
    found = find_latest_valid(ckpt_dir, BACKBONE_KEYS)  # loads the newest first: usually once
    step = step_of(found[0]) if found else None
    if found is None or (final is not None and step <= final_step):  # none past final.pt loads
        if final is None:
            raise MscnError(f"{path}: no final.pt and no readable checkpoints/ckpt_*.pt in this run directory")
        return final, final_step, None, load_checkpoint(final, BACKBONE_KEYS)
    if final is not None:
        note = (f"{path}: {found[0].name} (step {step}) is newer than final.pt (step {final_step}): "
                f"evaluating {found[0]}")
    elif (p / "checkpoints").is_dir():
        note = (f"{path}: no final.pt (a run still training, or stopped before its end): evaluating its newest "
                f"checkpoint {found[0].name} (step {step})")
    else:
        note = None  # a folder of ckpt_*.pt files, given as such
    return found[0], step, note, found[1]


def load_pretrained_state(path: str | Path) -> dict:
    """What evaluation reads (:data:`BACKBONE_KEYS`) from a checkpoint file or a run
    directory (its newest weights, :func:`pick_pretrained`)."""
    return pick_pretrained(path)[3]


UNREADABLE = ".unreadable"  # suffix of a checkpoint a resume set aside: kept, out of the rotation


def find_latest_valid(ckpt_dir: str | Path, required: tuple[str, ...] = _REQUIRED,
                      set_aside: bool = False) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``ckpt_dir`` that loads (with the ``required`` keys), with its
    state; None if there is none.

    ``set_aside`` (the run's own resume): a newer file that does not load is renamed
    ``ckpt_*.pt.unreadable``, kept for a look but no longer a checkpoint, so that neither
    the rotation nor the next resume takes its step for the run's."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path, required)
        except MscnError as e:
            kept = ""
            if isinstance(e, UnreadableCheckpoint):  # maybe a passing error: the file stays a checkpoint
                kept = "; left in place (it may read again later)"
            elif set_aside:
                try:
                    os.replace(path, path.with_name(path.name + UNREADABLE))
                    kept = f"; set aside as {path.name + UNREADABLE}"
                except OSError as err:
                    kept = f"; could not set it aside ({err.strerror or err})"
            print(f"[mscn] skipping {e}{kept}", flush=True)
    return None


def check_compatible(state: dict, arch: str, method: str, path: str | Path) -> None:
    """One clear error when a checkpoint belongs to another architecture or method."""
    if state["arch"] != arch or state["method"] != method:
        raise MscnError(
            f"{path}: checkpoint is {state['method']}/{state['arch']} but the config asks for "
            f"{method}/{arch}; set train.out_dir to a new folder, pass --resume none, or match "
            f"model.arch={state['arch']} method.name={state['method']}")


def rng_state() -> dict:
    """torch (and CUDA), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
