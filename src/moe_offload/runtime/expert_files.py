"""The layer files' experts as byte ranges, and their reads.

Each per-layer expert file keeps one expert's three tensors adjacent, so reading an expert is one
positional read of one contiguous byte range: into reused pinned staging buffers (CUDA), several in
parallel, or, with the host tier, out of RAM where every expert of the run was read once at the start.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint.layouts import PROJECTIONS, Layout
from ..checkpoint.quantize import QWEIGHT_DTYPE, qweight_name, scales_name
from ..checkpoint.shards import header_tensors, read_header
from ..errors import InputError


READ_THREADS = min(8, os.cpu_count() or 1)
ALIGN = 16  # elements: the kernels promise the compiler that host-tier offsets are multiples of this


@dataclass(frozen=True)
class ExpertSpan:
    """Where one expert lives in its layer file: one byte range and each projection's slice of it."""

    offset: int  # absolute byte offset of the range
    nbytes: int
    parts: tuple[tuple[int, int, tuple[int, ...]], ...]  # per projection: (start, end) in elements, shape
    dtype: torch.dtype  # the file's storage dtype (converted to the compute dtype on the device); uint8 if quantized
    bits: int = 16  # 8 or 4: parts are gate, up, down's qweight, then their scales, in bytes (checkpoint.quantize)
    group_size: int = 0

    @cached_property  # asked on every load: a prompt's misses run to hundreds
    def in_slot_order(self) -> bool:
        """gate, up and down stored back to back in that order, as a slot holds them (gate then up rows,
        then down; quantized: their qweights, then their scales): the bytes go into a slot as they are,
        and the kernels can read them in place."""
        ends = [0] + [end for _, end, _ in self.parts[:-1]]
        return all(start == end for (start, _, _), end in zip(self.parts, ends))

    def weight_shape(self, projection: int) -> tuple[int, int]:
        """Projection's weight shape [out, in] as computed (a quantized qweight packs in * bits / 8 bytes a row)."""
        out, cols = self.parts[projection][2]
        return (out, cols * 8 // self.bits) if self.bits != 16 else (out, cols)


# The float storage dtypes a layer file may hold (safetensors' names); checkpoints are usually bf16, fine-tunes
# often float16 or float32.
STORAGE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _expert_tensors(path: Path, tensors: dict, layout: Layout, layer: int, e: int, bits: int) -> list:
    """Expert e's tensors in slot order: gate, up, down (quantized: their qweights, then their scales),
    checked for dtype."""
    names = [layout.expert(layer, e, proj) for proj in PROJECTIONS]
    if bits != 16:
        names = [qweight_name(n) for n in names] + [scales_name(n) for n in names]
    infos = []
    for j, name in enumerate(names):
        info = tensors.get(name)
        if info is None:
            raise InputError(f"{path}: lacks tensor {name}")
        expected = ([QWEIGHT_DTYPE[bits]] if j < 3 else ["F16"]) if bits != 16 else list(STORAGE_DTYPES)
        if info.dtype not in expected:
            raise InputError(f"{path}: {info.name} is {info.dtype}, expected {' or '.join(expected)}")
        if bits == 16 and infos and info.dtype != infos[0].dtype:
            raise InputError(f"{path}: layer {layer} expert {e} mixes {infos[0].dtype} and {info.dtype}")
        infos.append(info)
    return infos


def expert_spans(path: Path, layout: Layout, layer: int) -> tuple[list[ExpertSpan], dict]:
    """Each expert's byte range in a layer file (16-bit or quantized), and the file's metadata, from one
    read of its header."""
    parsed = read_header(path)
    meta = parsed[0].get("__metadata__") or {}
    tensors = header_tensors(path, parsed)
    bits, group = int(meta.get("bits", 16)), int(meta.get("group_size", 0))
    hot_bits, hot = int(meta.get("hot_bits", bits)), set(json.loads(meta.get("hot_experts", "[]")))
    for b in {bits, hot_bits}:
        if b not in (16, *QWEIGHT_DTYPE):
            raise InputError(f"{path}: {b}-bit experts: the runtime reads 16, 8 or 4 bits")
    num = int(meta["num_experts"]) if "num_experts" in meta else None
    if num is None:  # count experts by name when the metadata lacks it
        num = 0
        while layout.expert(layer, num, PROJECTIONS[0]) in tensors:
            num += 1
    spans = []
    for e in range(num):
        bits_e = hot_bits if e in hot else bits  # precision by popularity: the hot experts' own bits
        infos = _expert_tensors(path, tensors, layout, layer, e, bits_e)
        start = min(i.offset for i in infos)
        end = max(i.offset + i.nbytes for i in infos)
        if end - start != sum(i.nbytes for i in infos):
            raise InputError(f"{path}: layer {layer} expert {e}'s tensors are not one contiguous byte range")
        dtype = STORAGE_DTYPES[infos[0].dtype] if bits_e == 16 else torch.uint8
        size = dtype.itemsize
        parts = tuple(((i.offset - start) // size, (i.offset - start + i.nbytes) // size, i.shape) for i in infos)
        spans.append(ExpertSpan(start, end - start, parts, dtype, bits_e, group))
    return spans, meta


class ExpertFiles:
    """`read(layer, experts)` yields (expert, its bytes, staging buffer or None) for each, in order.

    staging: on CUDA, reads land in reused pinned buffers, one per expert a step can miss
    (experts_per_token), so they run in parallel and the copies out of them are asynchronous; `release`
    marks a buffer free once the copy out of it is queued. host_tier: every expert of the layers read
    once into RAM (pinned when `pinned`), so a read is a slice of it.
    """

    def __init__(self, layer_files: dict[int, str | Path], layout: Layout, experts_per_token: int | None = None,
                 staging: bool = False, host_tier: bool = False, pinned: bool = False):
        self.spans: dict[int, list[ExpertSpan]] = {}
        recorded = []
        for layer, path in sorted(layer_files.items()):
            path = Path(path)
            if not path.is_file():
                raise InputError(f"expert file for layer {layer} does not exist: {path}")
            self.spans[layer], meta = expert_spans(path, layout, layer)
            if "experts_per_token" in meta:
                recorded.append(int(meta["experts_per_token"]))
        # the extractor records top-k in each layer file's metadata
        self.experts_per_token = max(recorded, default=None) if experts_per_token is None else experts_per_token
        self._fds = {layer: os.open(path, os.O_RDONLY) for layer, path in sorted(layer_files.items())}
        self._readers = ThreadPoolExecutor(max_workers=READ_THREADS)  # preadv releases the GIL
        max_bytes = max((s.nbytes for spans in self.spans.values() for s in spans), default=0)
        n_staging = self.experts_per_token or 1
        self._staging = [torch.empty(max_bytes, dtype=torch.uint8, pin_memory=True)
                         for _ in range(n_staging)] if staging else None
        self._staging_free = [torch.cuda.Event() for _ in range(n_staging)] if staging else None
        self._host: dict[int, tuple[torch.Tensor, int]] = {}  # layer -> (its experts' bytes, file offset of [0])
        if host_tier:
            for layer, spans in self.spans.items():
                start = min(s.offset for s in spans)
                buf = torch.empty(max(s.offset + s.nbytes for s in spans) - start, dtype=torch.uint8, pin_memory=pinned)
                self._read_into(buf, self._fds[layer], start)
                self._host[layer] = (buf, start)

    @property
    def host_tier_bytes(self) -> int:
        return sum(buf.nbytes for buf, _ in self._host.values())

    def host_offsets(self, layer: int) -> list[int] | None:
        """Each expert's element offset in `layer`'s host-tier buffer (quantized: byte offset), or None when
        the kernels cannot read the experts there in place: no host tier, parts out of slot order, or an
        offset (of gate or of down) that is not a multiple of ALIGN elements (quantized: float16 scales
        that do not start at an even byte)."""
        if layer not in self._host:
            return None
        out, start = [], self._host[layer][1]
        if len({span.bits for span in self.spans[layer]}) > 1:  # mixed precision: widened as they are copied in
            return None
        for span in self.spans[layer]:
            offset, rest = divmod(span.offset - start, span.dtype.itemsize)
            if not span.in_slot_order or rest:
                return None
            if span.bits == 16 and (offset % ALIGN or span.parts[2][0] % ALIGN):
                return None
            if span.bits != 16 and (offset + span.parts[3][0]) % 2:
                return None
            out.append(offset)
        return out

    def host_elements(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """`layer`'s host-tier buffer as elements of its storage dtype (the kernels read experts there)."""
        return self._host[layer][0].view(dtype)

    def read(self, layer: int, experts: list[int]) -> Iterator[tuple[int, torch.Tensor, int | None]]:
        spans = [self.spans[layer][e] for e in experts]
        if layer in self._host:  # no file reads: slices of RAM
            buf, start = self._host[layer]
            for e, span in zip(experts, spans):
                yield e, buf[span.offset - start: span.offset - start + span.nbytes], None
        elif self._staging is not None and len(experts) > len(self._staging):
            for e, span in zip(experts, spans):  # more than the staging buffers (a prefill): one at a time
                yield e, self._read(span, self._fds[layer], 0), 0
        else:
            reads = self._readers.map(lambda i: self._read(spans[i], self._fds[layer], i), range(len(experts)))
            for i, (e, raw) in enumerate(zip(experts, list(reads))):
                yield e, raw, i if self._staging is not None else None

    def release(self, buffer: int | None, stream) -> None:
        """Staging buffer `buffer` is free once what `stream` has queued (the copy out of it) has run."""
        if buffer is not None and self._staging is not None:
            self._staging_free[buffer].record(stream)

    @staticmethod
    def _read_into(buf: torch.Tensor, fd: int, offset: int) -> None:
        view, done = buf.numpy(), 0
        while done < buf.numel():  # a large read may come back short: continue where it stopped
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise InputError(f"short read: {done} of {buf.numel()} bytes at offset {offset}")
            done += n

    def _read(self, span: ExpertSpan, fd: int, buffer: int) -> torch.Tensor:
        if self._staging is not None:
            self._staging_free[buffer].synchronize()  # the previous async copy out of it must be done
            buf = self._staging[buffer][: span.nbytes]
        else:
            buf = torch.empty(span.nbytes, dtype=torch.uint8)
        # One positional read straight into the (possibly pinned) buffer: no intermediate bytes object.
        n = os.preadv(fd, [buf.numpy()], span.offset)
        if n != span.nbytes:
            raise InputError(f"short read: {n} of {span.nbytes} bytes at offset {span.offset}")
        return buf

    def close(self, wait: bool = True) -> None:
        """wait: join the read threads (not from a finalizer: a collection can run inside another thread's
        start, which holds threading's lock for its shutdown list, and a join there waits on that lock)."""
        self._readers.shutdown(wait=wait)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
