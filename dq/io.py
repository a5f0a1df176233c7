"""Small file helpers every layer may use (no dq imports but dq.errors)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dq.errors import UserError


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create `path` if needed and prove a file can be written there, before any work depends on it;
    UserError naming `what` (e.g. "data.cache_dir") and the path otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dq-write-check-"):
            pass
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or err}); choose another path") from err
    return path
