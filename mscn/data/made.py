"""Dataset folders that remember how they were made (``mscn data synth`` / ``photos``).

A generator writes ``<kind>.json`` with its parameters and ``complete: false`` first,
then ``complete: true`` at the end. Running it again with the same parameters reuses a
complete folder and rewrites an incomplete one (the bytes are deterministic); other
parameters, or a folder it did not make, are refused, so nothing is overwritten.
"""
from __future__ import annotations

import json
from pathlib import Path

from mscn.errors import DataError


def previous_build(out: Path, params: dict, meta_name: str, kind: str) -> dict | None:
    """The previous run's metadata if it made this exact dataset, else None.

    Refuses (DataError) to touch a folder made with other parameters, or one that is
    not a ``kind`` dataset at all (no ``meta_name``) and is not empty.
    """
    meta = out / meta_name
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta}: unreadable ({e}); delete {out} and run again") from None
        prev = old.get("params") or {}
        if prev != params:
            diff = ", ".join(f"{k}={prev.get(k)} (now {v})" for k, v in params.items() if prev.get(k) != v)
            raise DataError(f"{out}: holds a {kind} dataset made with {diff}; pick another OUT or delete {out}")
        return old if old.get("complete") else None  # incomplete: make it again (same bytes)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a {kind} dataset (no {meta_name}); pick another OUT")
    return None
