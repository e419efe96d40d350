"""Reading a checkpoint through its manifest: the one check every step after the download makes. Apart
from checkpoint.source (which writes the manifest), so that those steps do not run the sources' code."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..hashing import hash_file


def manifest_checkpoint(manifest: dict) -> Path:
    """The manifest's checkpoint directory, after checking that its files are those the manifest recorded:
    same size, and same mtime or else same xxh3-128 (a copied folder gets new mtimes, not new bytes)."""
    path = Path(manifest["path"])
    for entry in manifest["files"]:
        file = path / entry["name"]
        try:
            stat = file.stat()
        except OSError:
            raise InputError(f"checkpoint file {file} recorded in the manifest is gone; "
                             "redo it with: snakemake --forcerun download") from None
        changed = stat.st_size != entry["size"] or (
            stat.st_mtime_ns != entry.get("mtime_ns") and hash_file(file) != entry["xxh3_128"])
        if changed:
            raise InputError(f"checkpoint file {file} changed since results/model/manifest.json was made; "
                             "redo it with: snakemake --forcerun download")
    return path
