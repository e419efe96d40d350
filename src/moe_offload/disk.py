"""Free disk, checked before a job writes, so it fails at once with one line rather than mid-file."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import InputError

GB = 10**9


def format_bytes(n: int) -> str:
    """Bytes in the unit that fits: '1.1 GB', '420.5 MB', '12.0 kB', '512 bytes' (never '0.0 GB')."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def existing_parent(path: str | Path) -> Path:
    """The path itself, or its nearest existing parent (an output folder may not exist yet)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def check_disk(path: str | Path, need_bytes: int, what: str) -> None:
    """Stop before writing when the filesystem holding `path` has less free space than `need_bytes`."""
    path = existing_parent(path)
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise InputError(f"not enough disk for {what} under {path}: needs {format_bytes(need_bytes)}, "
                         f"{format_bytes(free)} free")


def disk_full_line(path: str | Path, written: int = 0) -> str:
    """The disk filled while writing `path`: how much it had written and how much is free now (the bytes
    it needs are more than those written; a writer that streams cannot say how many more)."""
    free = free_bytes(Path(path).parent)
    done = f"more than the {format_bytes(written)} written" if written else "more than is free"
    return f"disk full writing {path}: it needs {done}, {format_bytes(free)} free under {existing_parent(Path(path).parent)}"
