"""Whether an output path can be written, checked before long work (a benchmark, an
evaluation) rather than after it: a file where a folder belongs, a folder where a file
belongs, or no write permission."""
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
