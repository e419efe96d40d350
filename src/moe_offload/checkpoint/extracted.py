"""A checkpoint and every file extracted from it, in one directory: what benchmarks and tests load a runtime
from. A module of its own, which no workflow step imports, so that it changes no step's code version
(moe_offload.code_version) and the synthetic builder and the extractor stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .extract import extract_dense, extract_layer
from .layouts import Layout, TextConfig, detect_checkpoint
from .synthetic import build_synthetic


@dataclass(frozen=True)
class Extracted:
    ckpt: Path
    dir: Path
    dense: Path
    layers: dict[int, Path]
    layout: Layout
    config: TextConfig


def extract_all(checkpoint_dir: str | Path, out_dir: str | Path) -> Extracted:
    """Every expert layer's file and the dense file under out_dir, named as load_runtime looks for them.
    A file already there is kept: each is written atomically, so one that exists is whole."""
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    layout, cfg = detect_checkpoint(ckpt)
    layers = {layer: out / f"layer_{layer}.safetensors" for layer in cfg.expert_layers}
    for layer, path in layers.items():
        if not path.exists():
            extract_layer(ckpt, layer, path)
    if not (out / "dense.safetensors").exists():
        extract_dense(ckpt, out / "dense.safetensors")
    return Extracted(ckpt, out, out / "dense.safetensors", layers, layout, cfg)


def build_and_extract(spec: dict, workdir: str | Path) -> Extracted:
    """The synthetic checkpoint of `spec` at workdir/ckpt (built only if absent: a kept workdir is reused)
    and its files extracted beside it: the one way benchmarks and tests get a runtime's inputs."""
    ckpt = Path(workdir) / "ckpt"
    if not (ckpt / "config.json").exists():  # built in a sibling and renamed: config.json means whole
        build_synthetic(ckpt, spec)
    return extract_all(ckpt, workdir)
