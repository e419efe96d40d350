"""Whole-file xxh3-128, the hash every stage records and checks (the manifest, validation, the generation
jobs' file checks). A module of its own so that those stages share no other code through it: a change to
validation then reruns validation, not the download or generation (moe_offload.code_version)."""

from __future__ import annotations

from pathlib import Path

import xxhash

from .errors import InputError

CHUNK = 16 * 1024 * 1024


def hash_file(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_files(files: list[tuple[Path, str, str]], progress=None) -> None:
    """Each (file, recorded xxh3-128, rule or file that redoes it) hashed once: a generation job uses no
    byte that validation did not see."""
    for path, recorded, redo in files:
        try:
            actual = hash_file(path)
        except OSError as err:
            raise InputError(f"{path}: cannot be read ({err.strerror})") from None
        if actual != recorded:
            raise InputError(f"{path} does not match its recorded xxh3-128 (changed since validation); "
                             f"redo it with: snakemake --forcerun {redo}")
        if progress is not None:
            progress.update(1)
