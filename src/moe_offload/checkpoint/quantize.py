"""Group-wise integer quantization of a layer file's experts: int8, or int4 packed two to a byte.

Each weight [out, in] is cut along its input dimension into groups of `group_size`; a group keeps one
float16 scale and its values as round(w / scale), symmetric around zero (int8 in -127..127, int4 in
-8..7 stored as the unsigned nibble q + 8, the even input column in the low nibble). So w ~ q * scale,
which a kernel recovers in registers, one group at a time.

The scale is searched, not only taken from the group's largest magnitude (round-to-nearest): a few clip
ratios of it are tried and each group keeps the one with the least squared error, which trades a clipped
outlier for finer steps everywhere else. Both errors are recorded per expert, so the gain is on file.

A quantized layer file holds, per expert, gate, up and down's `qweight` and then their `scales`, all
back to back: gate and up's rows as a slot holds them (gate rows, then up rows), then down, so one
expert is one contiguous byte range, read in place like a 16-bit one.

Precision by popularity: the experts the router uses most (`hot`, chosen from a trace by
`hot_experts`) may keep more bits than the rest; the file's metadata lists them (`hot_bits`,
`hot_experts`) and each expert's tensors carry their own dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic import atomic_path
from ..disk import check_disk
from ..errors import InputError
from ..hashing import hash_file
from .layouts import PROJECTIONS, layout_by_name

log = logging.getLogger(__name__)

BITS = (8, 4)  # 16 means the extracted files as they are
QMAX = {8: 127, 4: 7}
QMIN = {8: -127, 4: -8}
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # 1.0 alone is round-to-nearest
SCALE_DTYPE = torch.float16  # 10 mantissa bits: a scale's rounding stays far below an int8 step
QWEIGHT_DTYPE = {8: "I8", 4: "U8"}


def check_scheme(bits: int, group_size: int, dims: dict[str, int] | None = None) -> None:
    """One line for a scheme that cannot be built: bits not 8 or 4, a group size that does not divide an
    input dimension (dims: name -> size, the hidden size for gate and up, the expert's intermediate size
    for down)."""
    if bits not in BITS:
        raise InputError(f"quantize bits must be 16, 8 or 4, got {bits!r}")
    if type(group_size) is not int or group_size < 2 or group_size % 2:
        raise InputError(f"quantize group_size must be an even whole number of at least 2, got {group_size!r}")
    for name, size in (dims or {}).items():
        if size % group_size:
            raise InputError(f"quantize group_size {group_size} does not divide the {name} ({size})")


def check_hot(bits: int, hot_bits: int, fraction) -> None:
    """One line for a precision-by-popularity setting that cannot be run: hot bits must be 8 above 4-bit
    experts (the cache's slots hold every expert at the hot precision), a fraction in [0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise InputError(f"quantize hot.fraction must be a number from 0 to 1, got {fraction!r}")
    if fraction and (bits, hot_bits) != (4, 8):
        raise InputError(f"quantize hot.bits {hot_bits!r} above bits {bits!r}: precision by popularity runs int8 "
                         "hot experts beside int4 ones (bits 4, hot.bits 8)")


def hot_experts(counts: dict[int, dict[int, int]], num_experts: int, fraction: float) -> dict[int, list[int]]:
    """Per layer, the round(fraction x num_experts) experts with the most uses (counts: layer -> expert ->
    routed uses in a trace), ties to the lower id; ascending."""
    n = round(fraction * num_experts)
    return {layer: sorted(sorted(range(num_experts), key=lambda e: (-uses.get(e, 0), e))[:n])
            for layer, uses in counts.items()}


def _round(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), QMIN[bits], QMAX[bits])


def quantize(w: torch.Tensor, bits: int, group_size: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q [out, in] int8 values, scales [out, in // group_size] float16). search: each group's
    scale is the best of CLIP_RATIOS times round-to-nearest's (least squared error); else round-to-nearest."""
    out, cols = w.shape
    check_scheme(bits, group_size, {"input dimension": cols})
    groups = w.to(torch.float32).reshape(out, cols // group_size, group_size)
    top = groups.abs().amax(-1, keepdim=True) / QMAX[bits]
    best_q = best_s = best_err = None
    for ratio in CLIP_RATIOS if search else CLIP_RATIOS[:1]:
        # the scale as stored (float16), never below its smallest normal: an all-zero group keeps q = 0
        scale = (top * ratio).clamp(min=torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE).to(torch.float32)
        q = _round(groups, scale, bits)
        err = (q * scale - groups).pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best_q, best_s, best_err = q, scale, err
        else:
            better = err < best_err
            best_q, best_s = torch.where(better, q, best_q), torch.where(better, scale, best_s)
            best_err = torch.minimum(err, best_err)
    return best_q.reshape(out, cols).to(torch.int8), best_s.squeeze(-1).to(SCALE_DTYPE)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values [out, in] as stored: int8 as they are; int4 as nibbles q + 8, two to a byte [out, in // 2]."""
    if bits == 8:
        return q.to(torch.int8).contiguous()
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack's inverse: int8 values [..., out, in]."""
    if bits == 8:
        return packed.view(torch.int8)
    u = packed.view(torch.uint8)
    low, high = (u & 0xF).to(torch.int8) - 8, (u >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(*u.shape[:-1], -1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """Stored (qweight, scales) -> the weight [..., out, in] in `dtype`, each value q * its group's scale in
    float32 (rounded to `dtype` once, as the kernels round)."""
    q = unpack(packed, bits).to(torch.float32)
    group = q.shape[-1] // scales.shape[-1]
    w = q.unflatten(-1, (-1, group)) * scales.to(torch.float32)[..., None]
    return w.flatten(-2).to(dtype)


def qweight_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".qweight"


def scales_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".scales"


def _errors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Relative Frobenius error and largest absolute error of (original, reconstruction) pairs taken together."""
    diff = sum((a.float() - b.float()).pow(2).sum().item() for a, b in pairs)
    norm = sum(a.float().pow(2).sum().item() for a, _ in pairs)
    return {"rel_frobenius": (diff / norm) ** 0.5 if norm else 0.0,
            "max_abs": max((a.float() - b.float()).abs().max().item() for a, b in pairs)}


def _header(entries: list[tuple[str, str, tuple, int]], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def quantize_layer(layer_file: str | Path, out_path: str | Path, bits: int, group_size: int,
                   search: bool = True, progress=None, device: str = "cpu",
                   hot: tuple[int, list[int]] | None = None) -> dict:
    """The experts of one extracted 16-bit layer file into a quantized layer file at out_path (atomically).
    Returns the record kept beside it: the file's xxh3-128, the scheme, and each expert's bits and
    reconstruction error (the searched scales' and round-to-nearest's). device: where the rounding is
    computed (the same bytes either way; a GPU makes a real-size model's layers quick). hot: (hot_bits,
    experts) kept at hot_bits, the rest at `bits`."""
    layer_file = Path(layer_file)
    if not layer_file.is_file():
        raise InputError(f"layer file {layer_file} does not exist")
    with safe_open(layer_file, framework="pt") as f:
        meta = f.metadata() or {}
        try:
            layout, layer, experts = layout_by_name(meta["layout"]), int(meta["layer"]), int(meta["num_experts"])
        except (KeyError, ValueError):
            raise InputError(f"{layer_file}: not an extracted layer file (its metadata lacks layout, layer or "
                             f"num_experts)") from None
        names = layout.expert_names(layer, experts)
        missing = [n for n in names if n not in f.keys()]
        if missing:
            raise InputError(f"{layer_file}: lacks tensor {missing[0]}")
        shape = {p: tuple(f.get_slice(layout.expert(layer, 0, p)).get_shape()) for p in PROJECTIONS}
        hot_bits, hot_set = (hot[0], set(hot[1])) if hot else (bits, set())
        for b in {bits, hot_bits}:
            check_scheme(b, group_size, {"hidden size": shape["gate_proj"][1],
                                         "expert intermediate size": shape["down_proj"][1]})
        outside = hot_set - set(range(experts))
        if outside:
            raise InputError(f"{layer_file}: hot expert {min(outside)} out of range (the layer has {experts})")
        entries, blobs, per_expert = [], [], []
        for e in range(experts):
            bits_e = hot_bits if e in hot_set else bits
            ws = [f.get_tensor(layout.expert(layer, e, p)).to(device) for p in PROJECTIONS]
            qs = [quantize(w, bits_e, group_size, search) for w in ws]
            rtn = [quantize(w, bits_e, group_size, False) for w in ws] if search else qs
            names_e = [layout.expert(layer, e, p) for p in PROJECTIONS]
            for name, (q, _) in zip(names_e, qs):
                packed = pack(q, bits_e).cpu()
                entries.append((qweight_name(name), QWEIGHT_DTYPE[bits_e], tuple(packed.shape), packed.nbytes))
                blobs.append(packed)
            for name, (_, s) in zip(names_e, qs):
                entries.append((scales_name(name), "F16", tuple(s.shape), s.nbytes))
                blobs.append(s.cpu())
            searched = _errors([(w, q.float() * s.float().repeat_interleave(group_size, 1)) for w, (q, s) in zip(ws, qs)])
            nearest = _errors([(w, q.float() * s.float().repeat_interleave(group_size, 1)) for w, (q, s) in zip(ws, rtn)])
            per_expert.append({"expert": e, "bits": bits_e, **searched,
                               "rel_frobenius_round_to_nearest": nearest["rel_frobenius"]})
            if progress is not None:
                progress.update(1)
    metadata = {**{k: meta[k] for k in ("format", "layout", "layer", "num_experts", "experts_per_token") if k in meta},
                "bits": str(bits), "group_size": str(group_size), "scales": "search" if search else "round_to_nearest",
                "source_xxh3_128": hash_file(layer_file)}
    if hot_set:
        metadata.update(hot_bits=str(hot_bits), hot_experts=json.dumps(sorted(hot_set)))
    header = _header(entries, metadata)
    check_disk(Path(out_path).parent, len(header) + sum(b.nbytes for b in blobs), Path(out_path).name)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out:
        out.write(header)
        for blob in blobs:
            out.write(blob.contiguous().view(torch.uint8).numpy().tobytes())
    log.info("layer %d: %d experts at %d bits (%d at %d), group %d, mean relative error %.4f (round-to-nearest "
             "%.4f)", layer, experts, bits, len(hot_set), hot_bits, group_size,
             sum(p["rel_frobenius"] for p in per_expert) / experts,
             sum(p["rel_frobenius_round_to_nearest"] for p in per_expert) / experts)
    return {"layer": layer, "bits": bits, "hot_bits": hot_bits if hot_set else None, "hot_experts": sorted(hot_set),
            "group_size": group_size, "scales": metadata["scales"],
            "file": str(out_path), "file_xxh3_128": hash_file(out_path), "source_xxh3_128": metadata["source_xxh3_128"],
            "experts": per_expert}
