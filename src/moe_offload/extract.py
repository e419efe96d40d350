"""Extraction: one layer's experts, or the dense weights, into a safetensors file of their own.

Tensors are gathered through the checkpoint's index (never one shard per layer: a layer's experts can
straddle shards) and streamed one at a time, so a job holds about one tensor, not a layer or a shard.
The safetensors library reads the source; the output is written in the safetensors format directly,
header first, because the library can only save tensors that are all in memory at once.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

from .atomic import atomic_path
from .checkpoint import Checkpoint, TensorInfo
from .errors import InputError
from .layouts import PROJECTIONS, Layout, detect_checkpoint

log = logging.getLogger(__name__)


def _header_bytes(infos: list[TensorInfo], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return len(raw).to_bytes(8, "little") + raw


def write_tensors(ckpt: Checkpoint, names: list[str], out_path: str | Path, metadata: dict[str, str], progress=None) -> int:
    """Stream `names` from the checkpoint into out_path (atomically); returns bytes of tensor data."""
    import torch  # imported here: the validation and planning steps need no torch
    from safetensors import safe_open

    infos = [ckpt.info(name) for name in names]
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out, ExitStack() as stack:
        out.write(_header_bytes(infos, metadata))
        handles = {}
        for info in infos:
            if info.file not in handles:
                handles[info.file] = stack.enter_context(safe_open(info.file, framework="pt"))
            tensor = handles[info.file].get_tensor(info.name)
            data = tensor.contiguous().view(torch.uint8).numpy()
            if data.nbytes != info.nbytes:
                raise AssertionError(f"{info.name}: read {data.nbytes} bytes, header says {info.nbytes}")
            out.write(memoryview(data))
            del tensor, data
            if progress is not None:
                progress.update(info.nbytes)
    return sum(i.nbytes for i in infos)


def _metadata(ckpt: Checkpoint, layout: Layout, **extra) -> dict[str, str]:
    return {"format": "pt", "source": str(ckpt.path.resolve()), "layout": layout.name, **{k: str(v) for k, v in extra.items()}}


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
