"""The runtime expert cache: (layer, expert) -> (gate, up, down) tensors, loaded from disk on a miss.

Each per-layer expert file keeps one expert's three bf16 tensors adjacent, so a miss is one positional
read of one contiguous byte range. Which key is resident and which is evicted is decided by
`cache_policy.Scoped`, the same object the offline simulator replays traces with, so a simulated hit
rate is this cache's hit rate.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache_policy import Scoped
from ..checkpoint.shards import header_tensors, read_header
from ..errors import InputError
from ..checkpoint.layouts import PROJECTIONS, Layout


READ_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class ExpertSpan:
    """Where one expert lives in its layer file: one byte range and each projection's slice of it."""

    offset: int  # absolute byte offset of the range
    nbytes: int
    parts: tuple[tuple[int, int, tuple[int, ...]], ...]  # per projection: (start, end) in elements, shape
    dtype: torch.dtype  # the file's storage dtype (converted to the compute dtype on the device)


# The float storage dtypes a layer file may hold (safetensors' names); checkpoints are usually bf16, fine-tunes
# often float16 or float32.
STORAGE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _expert_spans(path: Path, layout: Layout, layer: int) -> tuple[list[ExpertSpan], dict]:
    """Each expert's byte range in a layer file, and the file's metadata, from one read of its header."""
    parsed = read_header(path)
    meta = parsed[0].get("__metadata__") or {}
    tensors = header_tensors(path, parsed)
    num = int(meta["num_experts"]) if "num_experts" in meta else None
    if num is None:  # count experts by name when the metadata lacks it
        num = 0
        while layout.expert(layer, num, PROJECTIONS[0]) in tensors:
            num += 1
    spans = []
    for e in range(num):
        infos = []
        for proj in PROJECTIONS:
            info = tensors.get(layout.expert(layer, e, proj))
            if info is None:
                raise InputError(f"{path}: lacks tensor {layout.expert(layer, e, proj)}")
            if info.dtype not in STORAGE_DTYPES:
                raise InputError(f"{path}: {info.name} is {info.dtype}, expected one of {', '.join(STORAGE_DTYPES)}")
            if infos and info.dtype != infos[0].dtype:
                raise InputError(f"{path}: layer {layer} expert {e} mixes {infos[0].dtype} and {info.dtype}")
            infos.append(info)
        start = min(i.offset for i in infos)
        end = max(i.offset + i.nbytes for i in infos)
        if end - start != sum(i.nbytes for i in infos):
            raise InputError(f"{path}: layer {layer} expert {e}'s tensors are not one contiguous byte range")
        dtype = STORAGE_DTYPES[infos[0].dtype]
        size = dtype.itemsize
        parts = tuple(((i.offset - start) // size, (i.offset - start + i.nbytes) // size, i.shape) for i in infos)
        spans.append(ExpertSpan(start, end - start, parts, dtype))
    return spans, meta


def _in_slot_order(span: ExpertSpan) -> bool:
    """gate, up and down stored back to back in that order, as a slot holds them (w1 = gate then up rows)."""
    (g0, g1, _), (u0, u1, _), (d0, _, _) = span.parts
    return g0 == 0 and u0 == g1 and d0 == u1


class ExpertCache:
    """`get(layer, expert)` returns that expert's (gate [I,H], up [I,H], down [H,I]) on `device` in `dtype`.

    Resident experts live in preallocated slabs, one per pool (a layer, or the global pool):
    `w1[slot]` = gate rows then up rows [2I, H], `w2[slot]` = down [H, I], so memory is exactly the
    capacity times one expert, and a decode step can gather its top-k experts in one indexing op
    (`slabs`, with a device table expert -> slot). `get` returns views into a slot: valid until the
    slot is reused by a later miss.

    scope "per_layer" gives each layer `capacity` slots, "global" one pool of `capacity` slots.
    On CUDA, `pin_memory` reads into reused pinned staging buffers, one per expert a step can miss (so
    reads run in parallel and copies are async), and `side_stream` issues the copy and cast on a
    separate stream that the compute stream then waits on.

    `host_tier` keeps every expert of the given layers in host RAM (pinned on CUDA), read once from the
    layer files at start: a miss is then one copy from RAM (one DMA on CUDA) instead of a file read.
    It costs the experts' bytes in RAM, so it is for hosts that can hold them.

    `unified` (unified memory: Jetson Thor, GH200) holds every expert in slabs in pinned host RAM, read
    once at start in the compute dtype, which the GPU's kernels read in place: nothing is ever copied to
    the device and nothing is evicted. Capacity is then every expert of each layer.
    """

    def __init__(self, layer_files: dict[int, str | Path], layout: Layout, capacity: int, scope: str = "per_layer",
                 policy: str = "lru", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 pin_memory: bool = False, experts_per_token: int | None = None, side_stream: bool = False,
                 host_tier: bool = False, unified: bool = False, prefetch: bool = False):
        self.spans: dict[int, list[ExpertSpan]] = {}
        top_k_recorded = []
        for layer, path in sorted(layer_files.items()):
            path = Path(path)
            if not path.is_file():
                raise InputError(f"expert file for layer {layer} does not exist: {path}")
            self.spans[layer], meta = _expert_spans(path, layout, layer)
            if "experts_per_token" in meta:
                top_k_recorded.append(int(meta["experts_per_token"]))
        if experts_per_token is None:  # the extractor records it in each layer file's metadata
            experts_per_token = max(top_k_recorded, default=None)
        if unified:  # every expert of each layer stays where it was read (no second copy in a host tier)
            capacity, scope, host_tier = max(len(spans) for spans in self.spans.values()), "per_layer", False
        if experts_per_token is not None and capacity < experts_per_token:
            raise InputError(f"cache capacity {capacity} is below experts_per_token {experts_per_token}: "
                             f"one token needs {experts_per_token} experts of a layer")
        try:
            self.policy = Scoped(policy, scope, capacity)
        except ValueError as err:
            raise InputError(str(err)) from None
        self.layout, self.capacity, self.scope, self.policy_name = layout, capacity, scope, policy
        self.device, self.dtype, self.unified = torch.device(device), dtype, unified
        self._fds: dict[int, int] = {}
        for layer, path in sorted(layer_files.items()):
            self._fds[layer] = os.open(path, os.O_RDONLY)
        self.slot: dict[tuple[int, int], int] = {}  # resident key -> slot in its pool's slab
        self._pools: dict[int | None, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}  # w1, w2, free slots
        self._tables: dict[int, torch.Tensor] = {}  # layer -> [E] slot of each expert on device, -1 if absent
        # The tables as the host keeps them: written there, pushed to the device once per layer that
        # changed (a scalar write into a device tensor is a copy from pageable memory plus a host sync)
        self._host_tables: dict[int, torch.Tensor] = {}
        self._changed: set[int] = set()
        cuda = self.device.type == "cuda"
        max_bytes = max((s.nbytes for spans in self.spans.values() for s in spans), default=0)
        # Reused pinned buffers, one per expert a step can miss: reads land in them (in parallel) and
        # the H2D copies read from them asynchronously.
        self._readers = ThreadPoolExecutor(max_workers=READ_THREADS)  # preadv releases the GIL
        n_staging = experts_per_token or 1
        self._staging = [torch.empty(max_bytes, dtype=torch.uint8, pin_memory=True)
                         for _ in range(n_staging)] if cuda and pin_memory else None
        self._staging_free = [torch.cuda.Event() for _ in range(n_staging)] if self._staging else None
        self._stream = torch.cuda.Stream(self.device) if cuda and side_stream else None
        # router lookahead: predicted experts copied on a stream of their own while the GPU computes; only
        # from the host tier (a file read would block the host, which is the decode step's critical path)
        self.prefetch_stream = torch.cuda.Stream(self.device) if cuda and prefetch and host_tier else None
        self.prefetches = prefetch and host_tier and not unified
        self._prefetched: set[tuple[int, int]] = set()  # loaded ahead, not yet asked for
        self._host: dict[int, tuple[torch.Tensor, int]] = {}  # layer -> (its experts' bytes, file offset of [0])
        if host_tier:
            for layer, spans in self.spans.items():
                start = min(s.offset for s in spans)
                end = max(s.offset + s.nbytes for s in spans)
                buf = torch.empty(end - start, dtype=torch.uint8, pin_memory=cuda)
                self._read_into(buf, self._fds[layer], start)
                self._host[layer] = (buf, start)
        self.reset_stats()
        for layer in self.spans:
            self._pool(layer)  # allocate every slab now: the memory held is the bound, from the start
            if unified:
                self.get_many(layer, list(range(len(self.spans[layer]))))
        self.reset_stats()  # the start's reads are not the run's misses

    @property
    def keeps_step_resident(self) -> bool:
        """With LRU and capacity >= top-k, no access of a step evicts another expert of the same step
        (they are the most recent), so a step may gather all its experts after loading them."""
        return self.policy_name == "lru"

    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.bytes_loaded = 0
        self.prefetched = self.prefetch_used = 0  # experts loaded ahead; of them, asked for before eviction
        self.load_seconds = 0.0

    def stats(self) -> dict:
        accesses = self.hits + self.misses
        return dict(hits=self.hits, misses=self.misses, evictions=self.evictions, bytes_loaded=self.bytes_loaded,
                    load_seconds=self.load_seconds, hit_rate=self.hits / accesses if accesses else 0.0,
                    prefetched=self.prefetched, prefetch_used=self.prefetch_used)

    def num_experts(self, layer: int) -> int:
        return len(self.spans[layer])

    def expert_bytes(self, layer: int, expert: int) -> int:
        return self.spans[layer][expert].nbytes

    def _pool(self, layer: int):
        pool_id = layer if self.scope == "per_layer" else None
        if pool_id not in self._pools:
            gate, _, down = self.spans[layer][0].parts
            (i, h), slots = gate[2], self.capacity
            slots = min(slots, sum(len(s) for s in self.spans.values()) if pool_id is None else len(self.spans[layer]))
            where = dict(device=self.device)
            if self.unified:  # in pinned host RAM, which the GPU reads in place
                where = dict(device="cpu", pin_memory=self.device.type == "cuda")
            w1 = torch.empty(slots, 2 * i, h, dtype=self.dtype, **where)
            w2 = torch.empty(slots, *down[2], dtype=self.dtype, **where)
            self._pools[pool_id] = (w1, w2, list(range(slots - 1, -1, -1)))
        if layer not in self._tables:
            self._host_tables[layer] = torch.full((len(self.spans[layer]),), -1, dtype=torch.long)
            # on the CPU the host's table is the table
            self._tables[layer] = self._host_tables[layer].to(self.device)
        return self._pools[pool_id]

    def is_resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.slot

    @property
    def slots(self) -> int:
        """Experts the cache can hold, over all its pools."""
        return sum(w1.shape[0] for w1, _, _ in self._pools.values())

    @property
    def slab_bytes(self) -> int:
        """The memory the cache holds for experts: every slot, preallocated (host RAM when unified)."""
        return sum(w1.nbytes + w2.nbytes for w1, w2, _ in self._pools.values())

    def slabs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [slots, 2I, H], w2 [slots, H, I], table [E]): w1[table[e]] is expert e's gate and up."""
        w1, w2, _ = self._pool(layer)
        return w1, w2, self._tables[layer]

    def _views(self, layer: int, slot: int):
        w1, w2, _ = self._pool(layer)
        i = w1.shape[1] // 2
        return w1[slot, :i], w1[slot, i:], w2[slot]

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.get_many(layer, [expert])
        return self._views(layer, self.slot[(layer, expert)])

    def get_many(self, layer: int, experts: list[int]) -> None:
        """Make `experts` of `layer` resident, deciding hits and evictions in order exactly as that many
        `get` calls would, then reading the misses' bytes in parallel. With LRU (keeps_step_resident)
        none of them evicts another; with another policy, call `get` one expert at a time."""
        if layer not in self.spans:
            raise InputError(f"no expert file was given for layer {layer}")
        misses = []
        for expert in experts:
            if not 0 <= expert < len(self.spans[layer]):
                raise InputError(f"layer {layer} has experts 0..{len(self.spans[layer]) - 1}, asked for {expert}")
            if self._admit(layer, expert):
                self.hits += 1
                if (layer, expert) in self._prefetched:  # a miss the lookahead hid
                    self._prefetched.discard((layer, expert))
                    self.prefetch_used += 1
                continue
            self.misses += 1
            misses.append(expert)
        if misses:
            self._load_all(layer, misses)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Load the absent ones of `experts` (predicted for `layer`) on the prefetch stream, as the most
        recent keys of the policy, counting neither hits nor misses; `wait_prefetch` before reading them."""
        if not self.prefetches or layer not in self.spans:
            return
        absent = [e for e in dict.fromkeys(experts) if not self.is_resident(layer, e)]
        for expert in absent:
            self._admit(layer, expert)
            self._prefetched.add((layer, expert))
        self.prefetched += len(absent)
        if absent:
            self._load_all(layer, absent, self.prefetch_stream)

    def wait_prefetch(self) -> None:
        """The compute stream waits for the experts loaded ahead (before kernels read their slots)."""
        if self.prefetch_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.prefetch_stream)

    def _admit(self, layer: int, expert: int) -> bool:
        """The policy's access to (layer, expert): True on a hit; else the key gets a slot (evicting the
        policy's victim) and False."""
        key = (layer, expert)
        hit, evicted = self.policy.access(key)
        if hit:
            return True
        free = self._pool(layer)[2]
        if evicted is not None:
            self.evictions += 1
            self._prefetched.discard(evicted)
            free.append(self.slot.pop(evicted))
            self._set_slot(*evicted, -1)
        self.slot[key] = free.pop()
        return False

    def _load_all(self, layer: int, misses: list[int], stream=None) -> None:
        start = time.perf_counter()
        spans = [self.spans[layer][e] for e in misses]
        if layer in self._host:  # no file reads: each miss is a copy out of RAM
            for e, span in zip(misses, spans):
                self._load(layer, e, self._read(span, self._fds[layer], 0, layer), None, stream)
        elif self._staging is not None and len(misses) > len(self._staging):
            for e in misses:  # more misses than staging buffers (a prefill): one at a time
                self._load(layer, e, self._read(self.spans[layer][e], self._fds[layer], 0), 0)
        else:
            reads = self._readers.map(lambda i: self._read(spans[i], self._fds[layer], i), range(len(misses)))
            for i, (e, raw) in enumerate(zip(misses, list(reads))):
                self._load(layer, e, raw, i)
        self._push_tables()
        self.bytes_loaded += sum(span.nbytes for span in spans)
        self.load_seconds += time.perf_counter() - start

    @property
    def host_tier_bytes(self) -> int:
        return sum(buf.nbytes for buf, _ in self._host.values())

    @staticmethod
    def _read_into(buf: torch.Tensor, fd: int, offset: int) -> None:
        view, done = buf.numpy(), 0
        while done < buf.numel():  # a large read may come back short: continue where it stopped
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise InputError(f"short read: {done} of {buf.numel()} bytes at offset {offset}")
            done += n

    def _read(self, span: ExpertSpan, fd: int, buffer: int, layer: int | None = None) -> torch.Tensor:
        if layer in self._host:  # the host tier: the bytes are already in (pinned) RAM
            buf, start = self._host[layer]
            return buf[span.offset - start: span.offset - start + span.nbytes]
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

    def _load(self, layer: int, expert: int, raw: torch.Tensor, buffer: int, stream=None) -> None:
        """Copy one expert's bytes (read into `raw`, pinned staging buffer number `buffer` when pinned)
        into its slot, cast to the compute dtype; on `stream` (a prefetch) or the cache's own."""
        span, slot = self.spans[layer][expert], self.slot[(layer, expert)]
        targets = self._views(layer, slot)
        if not targets[0].is_cuda:  # on the CPU, or into a unified slab in host RAM
            flat = raw.view(span.dtype)
            for target, (a, b, shape) in zip(targets, span.parts):
                target.copy_(flat[a:b].view(shape))
            self._set_slot(layer, expert, slot)
            return
        main = torch.cuda.current_stream(self.device)
        if stream is None:
            # a prefetch in flight may be writing the slot this load was given: it lands first
            self.wait_prefetch()
            stream = self._stream or main
        if self._stream is not None and stream is self._stream:
            stream.wait_stream(main)  # the slot's previous expert may still be read by queued kernels
        with torch.cuda.stream(stream):
            if span.dtype == self.dtype and _in_slot_order(span):
                # stored as computed, gate/up/down back to back as w1[slot] then w2[slot]: two DMAs straight
                # into the slot, no staging tensor on the device and no copies there
                w1, w2, _ = self._pool(layer)
                n1 = w1[slot].numel() * span.dtype.itemsize
                for dst, src in ((w1[slot], raw[:n1]), (w2[slot], raw[n1:])):
                    dst.view(-1).view(torch.uint8).copy_(src, non_blocking=raw.is_pinned())
            else:
                # Copy the stored bytes (bf16: half those of f32) and cast on the device, into the slot.
                flat = raw.to(self.device, non_blocking=raw.is_pinned()).view(span.dtype)
                for target, (a, b, shape) in zip(targets, span.parts):
                    target.copy_(flat[a:b].view(shape))
            if buffer is not None and self._staging is not None:
                self._staging_free[buffer].record(stream)
        if stream is self._stream:
            main.wait_stream(self._stream)
        self._set_slot(layer, expert, slot)

    def _set_slot(self, layer: int, expert: int, slot: int) -> None:
        self._host_tables[layer][expert] = slot
        self._changed.add(layer)

    def _push_tables(self) -> None:
        """The changed layers' tables to the device, each in one copy queued on the compute stream (from a
        pinned snapshot, which the caching host allocator keeps until the copy is done)."""
        for layer in self._changed:
            if self._tables[layer] is not self._host_tables[layer]:
                self._tables[layer].copy_(self._host_tables[layer].pin_memory(), non_blocking=True)
        self._changed.clear()

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
