"""Where a bench writes its figures: checked before the timing, written whole at the end.

Every bench script takes ``--json FILE``. A path that cannot be written must fail in one
line before minutes of timing, not with a traceback after them; a missing parent folder is
made (as ``mscn`` does for its outputs); the file is replaced atomically, so a bench stopped
mid-write leaves the previous figures, not half a file.
"""
from __future__ import annotations

import json
from pathlib import Path

from mscn.errors import MscnError
from mscn.paths import not_creatable, write_atomic


def check_target(flag: str, path: str | Path | None) -> None:
    """One MscnError naming ``flag`` when ``path`` (None: nothing asked) cannot be written."""
    why = not_creatable(path) if path else None
    if why:
        raise MscnError(f"{flag} {path}: cannot be written there ({why})")


def write_json(doc, path: str | Path) -> None:
    """``doc`` as indented JSON at ``path`` (parent folders made), replaced atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1))
