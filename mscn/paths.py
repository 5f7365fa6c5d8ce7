"""Output paths: whether one can be written, checked before long work (a benchmark, an
evaluation) rather than after it (a file where a folder belongs, a folder where a file
belongs, or no write permission), and writing a text file whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path


def creatable(path: str | os.PathLike, folder: bool = False) -> bool:
    """Whether ``path`` is, or can be made, a ``folder`` (else a file) that this process may
    write: an existing one of that kind in a writable place, or, when it does not exist yet,
    its nearest existing ancestor a writable folder (the parents are made when it is written)."""
    path = Path(path).resolve()
    if path.exists():
        return path.is_dir() == folder and os.access(path if folder else path.parent, os.W_OK)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK)


def not_creatable(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written as a ``folder`` (else a file), for a one-line refusal:
    "a file" where a folder belongs, "a folder" where a file belongs, or "not writable";
    None when it can (:func:`creatable`)."""
    if creatable(path, folder):
        return None
    if folder and Path(path).is_file():
        return "a file"
    if not folder and Path(path).is_dir():
        return "a folder"
    return "not writable"


def write_atomic(path: str | os.PathLike, text: str, errors: str = "strict") -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it, renamed into place:
    a run killed or a disk filling up mid-write leaves the old file, never half a new one, and
    no temporary behind. An OSError still reaches the caller, which names what it was writing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8", errors=errors)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
