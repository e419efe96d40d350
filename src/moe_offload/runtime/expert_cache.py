"""The runtime expert cache: (layer, expert) -> (gate, up, down) tensors, loaded on a miss.

Resident experts live in slots of preallocated slabs, found through a slot table the kernels read; the
bytes come from `expert_files`. Which key is resident and which is evicted is decided by
`cache_policy.Scoped`, the same object the offline simulator replays traces with, so a simulated hit
rate is this cache's hit rate.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checkpoint.layouts import Layout
from ..errors import InputError
from .cache_policy import Scoped
from .device_policy import DevicePolicy, host_offsets, in_slot_order
from .expert_files import ExpertFiles, ExpertSpan


def _copy_parts(flat: torch.Tensor, span: ExpertSpan, targets) -> None:
    """One expert's stored elements (flat, in the storage dtype) into its slot's gate, up and down, cast."""
    for target, (a, b, shape) in zip(targets, span.parts):
        target.copy_(flat[a:b].view(shape))


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

    `in_place_misses` (with the host tier, LRU, per layer, no prefetch; None: whenever those hold) keeps
    a copy of the policy on the device (`device_policy`) for one-token steps through the kernels: a miss
    is read from the host tier in place and written into its slot inside the step (see device_policy).
    While decode steps run that way the device's copy is the truth; every host entry point first takes
    it back (`to_host`).
    """

    def __init__(self, layer_files: dict[int, str | Path], layout: Layout, capacity: int, scope: str = "per_layer",
                 policy: str = "lru", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 pin_memory: bool = False, experts_per_token: int | None = None, side_stream: bool = False,
                 host_tier: bool = False, unified: bool = False, prefetch: bool = False,
                 in_place_misses: bool | None = None):
        cuda = torch.device(device).type == "cuda"
        # unified: every expert of each layer stays where it was read (no second copy in a host tier)
        self.files = ExpertFiles(layer_files, layout, experts_per_token, staging=cuda and pin_memory,
                                 host_tier=host_tier and not unified, pinned=cuda)
        self.spans: dict[int, list[ExpertSpan]] = self.files.spans
        experts_per_token = self.files.experts_per_token
        if unified:
            capacity, scope = max(len(spans) for spans in self.spans.values()), "per_layer"
        if experts_per_token is not None and capacity < experts_per_token:
            raise InputError(f"cache capacity {capacity} is below experts_per_token {experts_per_token}: "
                             f"one token needs {experts_per_token} experts of a layer")
        try:
            self.policy = Scoped(policy, scope, capacity)
        except ValueError as err:
            raise InputError(str(err)) from None
        self.layout, self.capacity, self.scope, self.policy_name = layout, capacity, scope, policy
        self.device, self.dtype, self.unified = torch.device(device), dtype, unified
        self.slot: dict[tuple[int, int], int] = {}  # resident key -> slot in its pool's slab
        self._pools: dict[int | None, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}  # w1, w2, free slots
        self._tables: dict[int, torch.Tensor] = {}  # layer -> [E] slot of each expert on device, -1 if absent
        # The tables as the host keeps them: written there, pushed to the device once per layer that
        # changed (a scalar write into a device tensor is a copy from pageable memory plus a host sync)
        self._host_tables: dict[int, torch.Tensor] = {}
        self._changed: set[int] = set()
        self._stream = torch.cuda.Stream(self.device) if cuda and side_stream else None
        # router lookahead: predicted experts copied on a stream of their own while the GPU computes; only
        # from the host tier (a file read would block the host, which is the decode step's critical path)
        self.prefetches = prefetch and host_tier and not unified
        self.prefetch_stream = torch.cuda.Stream(self.device) if cuda and self.prefetches else None
        self._prefetched: set[tuple[int, int]] = set()  # loaded ahead, not yet asked for
        self.device_policy, self.on_device = None, False  # see in_place_misses
        self.reset_stats()
        for layer in self.spans:
            self._pool(layer)  # allocate every slab now: the memory held is the bound, from the start
            if unified:
                self.get_many(layer, list(range(len(self.spans[layer]))))
        self.reset_stats()  # the start's reads are not the run's misses
        if in_place_misses is not False and host_tier and not unified and policy == "lru" and scope == "per_layer" \
                and not self.prefetches:
            offsets = {L: host_offsets(spans, self.files.host_start(L)) for L, spans in self.spans.items()}
            if all(o is not None for o in offsets.values()):
                self.device_policy = DevicePolicy(self, offsets)
        if in_place_misses and self.device_policy is None:
            raise InputError("in-place misses need the host tier, an LRU per-layer cache, no prefetch, and experts "
                             "stored gate, up, down back to back")

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
        self.to_host()
        return (layer, expert) in self.slot

    def resident_count(self) -> int:
        self.to_host()
        return len(self.slot)

    def to_device(self) -> None:
        """Hand the policy to the device's copy (before decode steps that read misses in place)."""
        if self.device_policy is not None and not self.on_device:
            self.device_policy.push()
            self.on_device = True

    def to_host(self) -> None:
        """Take the policy back from the device's copy (before the host decides anything)."""
        if self.on_device:
            self.device_policy.pull()
            self.on_device = False

    def count_step(self, layer: int, experts: list[int], outcomes: list[float]) -> None:
        """A step's experts of `layer` as the device's policy served them (outcome 0 hit, 1 miss, 2 miss
        that evicted): the counters the host would have kept."""
        for expert, outcome in zip(experts, outcomes):
            if outcome == 0:
                self.hits += 1
                continue
            self.misses += 1
            self.evictions += outcome == 2
            self.bytes_loaded += self.spans[layer][expert].nbytes

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
        self.to_host()
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
        self.to_host()
        absent = [e for e in dict.fromkeys(experts) if not self.is_resident(layer, e)]
        for expert in absent:
            self._admit(layer, expert)
            self._prefetched.add((layer, expert))
        self.prefetched += len(absent)
        if absent:
            if self.prefetch_stream is not None:  # an evicted slot may still be read by queued kernels
                self.prefetch_stream.wait_stream(torch.cuda.current_stream(self.device))
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
        for expert, raw, buffer in self.files.read(layer, misses):
            self._load(layer, expert, raw, buffer, stream)
        self.push_tables()
        self.bytes_loaded += sum(self.spans[layer][e].nbytes for e in misses)
        self.load_seconds += time.perf_counter() - start

    @property
    def host_tier_bytes(self) -> int:
        return self.files.host_tier_bytes

    def _load(self, layer: int, expert: int, raw: torch.Tensor, buffer: int | None, stream=None) -> None:
        """Copy one expert's bytes (`raw`, in staging buffer `buffer` or None) into its slot, cast to the
        compute dtype; on `stream` (a prefetch) or the cache's own."""
        span, slot = self.spans[layer][expert], self.slot[(layer, expert)]
        targets = self._views(layer, slot)
        if not targets[0].is_cuda:  # on the CPU, or into a unified slab in host RAM
            _copy_parts(raw.view(span.dtype), span, targets)
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
            if span.dtype == self.dtype and in_slot_order(span):
                # stored as computed, gate/up/down back to back as w1[slot] then w2[slot]: two DMAs straight
                # into the slot, no staging tensor on the device and no copies there
                w1, w2, _ = self._pool(layer)
                n1 = w1[slot].numel() * span.dtype.itemsize
                for dst, src in ((w1[slot], raw[:n1]), (w2[slot], raw[n1:])):
                    dst.view(-1).view(torch.uint8).copy_(src, non_blocking=raw.is_pinned())
            else:
                # Copy the stored bytes (bf16: half those of f32) and cast on the device, into the slot.
                _copy_parts(raw.to(self.device, non_blocking=raw.is_pinned()).view(span.dtype), span, targets)
            self.files.release(buffer, stream)
        if stream is self._stream:
            main.wait_stream(self._stream)
        self._set_slot(layer, expert, slot)

    def _set_slot(self, layer: int, expert: int, slot: int) -> None:
        self._host_tables[layer][expert] = slot
        self._changed.add(layer)

    def push_tables(self) -> None:
        """The changed layers' tables to the device, each in one copy queued on the compute stream (from a
        pinned snapshot, which the caching host allocator keeps until the copy is done)."""
        for layer in self._changed:
            if self._tables[layer] is not self._host_tables[layer]:
                self._tables[layer].copy_(self._host_tables[layer].pin_memory(), non_blocking=True)
        self._changed.clear()

    def free_slots(self, layer: int) -> list[int]:
        """`layer`'s pool's free slots (the last is taken next)."""
        return self._pool(layer)[2]

    def pull_table(self, layer: int) -> None:
        """The host's copy of `layer`'s slot table from the device's (after the device's policy wrote it)."""
        if self._tables[layer] is not self._host_tables[layer]:
            self._host_tables[layer].copy_(self._tables[layer])

    def close(self) -> None:
        self.files.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
