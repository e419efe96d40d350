"""Free disk, checked before a job writes, so it fails at once with one line rather than mid-file."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import InputError

GB = 10**9


def check_disk(path: str | Path, need_bytes: int, what: str) -> None:
    """Stop before writing when the filesystem holding `path` has less free space than `need_bytes`."""
    path = Path(path)
    while not path.exists():  # the output folder may not exist yet: ask its nearest existing parent
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise InputError(f"not enough disk for {what} under {path}: needs {need_bytes / GB:.1f} GB, "
                         f"{free / GB:.1f} GB free")
