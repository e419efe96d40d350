"""Whole-file xxh3-128, the hash every stage records and checks (the manifest, validation, the generation
jobs' file checks). A module of its own so that those stages share no other code through it: a change to
validation then reruns validation, not the download or generation (moe_offload.code_version)."""

from __future__ import annotations

from pathlib import Path

import xxhash

CHUNK = 16 * 1024 * 1024


def hash_file(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
