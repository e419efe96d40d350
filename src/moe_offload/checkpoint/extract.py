"""Extraction: one layer's experts, or the dense weights, into a safetensors file of their own.

Tensors are gathered through the checkpoint's index (never one shard per layer: a layer's experts can
straddle shards) and streamed one at a time, so a job holds about one tensor, not a layer or a shard.
Bytes move file to file in the kernel (copy_file_range) at the offsets the source headers declare: the
output's header is written first, then each tensor's bytes, so a job holds no tensor in memory at all
(the safetensors library can only save tensors that are all in memory at once). Validation re-reads
both files through its own, separately written offset reader.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import xxhash

from ..atomic import atomic_path
from ..hashing import hash_file
from ..disk import check_disk
from .shards import INDEX_NAME, SINGLE_NAME, Checkpoint, TensorInfo
from ..errors import InputError
from .layouts import PROJECTIONS, Layout, detect_checkpoint

log = logging.getLogger(__name__)
COPY_CHUNK = 16 * 1024 * 1024


def _header_bytes(infos: list[TensorInfo], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return len(raw).to_bytes(8, "little") + raw


def _copy_range(src: int, dst: int, nbytes: int, src_offset: int) -> None:
    """Append nbytes of src (from src_offset) to dst inside the kernel, no user-space buffer, falling
    back to pread/write where copy_file_range is unavailable. The output's own file position is used
    (no explicit output offset): measured faster, and the output is written front to back anyway."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src, dst, nbytes - done, src_offset + done)
        except (AttributeError, OSError):  # no copy_file_range on this platform or filesystem pair
            n = os.write(dst, os.pread(src, min(COPY_CHUNK, nbytes - done), src_offset + done))
        if n == 0:
            raise InputError(f"source ended {nbytes - done} bytes early (truncated shard?)")
        done += n


def write_tensors(ckpt: Checkpoint, names: list[str], out_path: str | Path, metadata: dict[str, str], progress=None) -> int:
    """Copy `names` from the checkpoint into a new safetensors file at out_path (atomically), tensor by
    tensor at the offsets of the source headers; returns bytes of tensor data."""
    infos = [ckpt.info(name) for name in names]
    header = _header_bytes(infos, metadata)
    check_disk(Path(out_path).parent, len(header) + sum(i.nbytes for i in infos), Path(out_path).name)
    sources: dict[Path, int] = {}
    try:
        with atomic_path(out_path) as tmp, open(tmp, "wb") as out:
            out.write(header)
            out.flush()  # the tensors follow at the file position, written by the kernel
            for info in infos:
                if info.file not in sources:
                    sources[info.file] = os.open(info.file, os.O_RDONLY)
                _copy_range(sources[info.file], out.fileno(), info.nbytes, info.offset)
                if progress is not None:
                    progress.update(info.nbytes)
    finally:
        for fd in sources.values():
            os.close(fd)
    return sum(i.nbytes for i in infos)


def _metadata(ckpt: Checkpoint, layout: Layout, **extra) -> dict[str, str]:
    return {"format": "pt", "source_index_xxh3_128": _source_id(ckpt), "layout": layout.name,
            **{k: str(v) for k, v in extra.items()}}


def _source_id(ckpt: Checkpoint) -> str:
    """The source named by content, not by place (no absolute path in a file's header), so that two clones,
    or a moved checkpoint, extract byte-identical files: the xxh3-128 of its index, or, for a single-file
    checkpoint, of that file's header (its own index)."""
    index = ckpt.path / INDEX_NAME
    if index.is_file():
        return hash_file(index)
    with open(ckpt.shard_path(SINGLE_NAME), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return xxhash.xxh3_128(f.read(n)).hexdigest()


def extract_layer(checkpoint_dir: str | Path, layer: int, out_path: str | Path, progress=None) -> int:
    ckpt = Checkpoint(checkpoint_dir)
    layout, cfg = detect_checkpoint(checkpoint_dir)
    cfg.check_layer(layer)
    names = layout.expert_names(layer, cfg.num_experts)
    shards = sorted({ckpt.weight_map.get(n, "?") for n in names})
    log.info("layer %d: %d experts x %d tensors from shards %s", layer, cfg.num_experts, len(PROJECTIONS), shards)
    meta = _metadata(ckpt, layout, layer=layer, num_experts=cfg.num_experts, experts_per_token=cfg.experts_per_token)
    return write_tensors(ckpt, names, out_path, meta, progress)


def extract_dense(checkpoint_dir: str | Path, out_path: str | Path, progress=None) -> int:
    ckpt = Checkpoint(checkpoint_dir)
    layout, cfg = detect_checkpoint(checkpoint_dir)
    names = layout.dense_names(ckpt.weight_map)
    if not names:
        raise InputError(f"{ckpt.path}: no tensor starts with {' or '.join(layout.component)} (layout {layout.name})")
    log.info("dense: %d tensors", len(names))
    return write_tensors(ckpt, names, out_path, _metadata(ckpt, layout, num_layers=cfg.num_layers), progress)


def extract_towers(checkpoint_dir: str | Path, out_path: str | Path, progress=None) -> int:
    """The audio and vision towers' tensors (a multimodal thinker's), like the dense file."""
    ckpt = Checkpoint(checkpoint_dir)
    layout, _ = detect_checkpoint(checkpoint_dir)
    names = layout.tower_names(ckpt.weight_map)
    if not names:
        raise InputError(f"{ckpt.path}: no audio or vision tower tensors (layout {layout.name}): the checkpoint "
                         "takes text only")
    log.info("towers: %d tensors", len(names))
    return write_tensors(ckpt, names, out_path, _metadata(ckpt, layout, part="towers"), progress)
