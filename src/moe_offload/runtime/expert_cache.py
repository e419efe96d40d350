"""The expert cache the model uses: (layer, expert) -> that expert's weights in a slot, loaded on a miss.

Three parts under one facade, built from one validated `CacheOptions`:
- slots.py: the slabs that hold resident experts and the tables the kernels read;
- residency.py: which expert is in which slot (the host's policy, or its copy on the GPU);
- loading, here and in expert_files.py: the layer files' bytes (staging buffers, the host tier), the
  streams they are copied on, and router lookahead's prefetch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.layouts import Layout
from ..errors import InputError
from .cache_policy import ONLINE_POLICIES
from .expert_files import ExpertFiles
from .residency import Residency
from .slots import Slots

COUNTERS = ("hits", "misses", "evictions", "bytes_loaded", "load_seconds", "prefetched", "prefetch_used")


@dataclass(frozen=True)
class CacheOptions:
    """capacity: experts per pool (a layer, scope per_layer; all layers, global); None: every expert.
    pin_memory: on CUDA, misses read from files land in reused pinned staging buffers (parallel reads,
    asynchronous copies). side_stream: copies on a stream of their own. host_tier: every expert of the run
    in host RAM (pinned on CUDA), read once: a miss is a copy from RAM, not a file read. unified
    (unified-memory machines): every expert in slabs in pinned host RAM, which the GPU's kernels read in
    place; nothing is copied or evicted. prefetch: with the host tier, router lookahead loads predicted
    experts on a side stream. in_place_misses: with the host tier, an LRU per layer and no prefetch, decode
    steps read absent experts from the host tier in place (None: whenever those hold)."""

    capacity: int | None = None
    scope: str = "per_layer"
    policy: str = "lru"
    pin_memory: bool = False
    side_stream: bool = False
    host_tier: bool = False
    unified: bool = False
    prefetch: bool = False
    in_place_misses: bool | None = None

    def __post_init__(self):
        if self.scope not in ("per_layer", "global"):
            raise InputError(f"unknown cache scope {self.scope!r} (per_layer or global)")
        if self.policy not in ONLINE_POLICIES:
            raise InputError(f"unknown cache policy {self.policy!r} (known: {', '.join(ONLINE_POLICIES)})")
        if self.capacity is not None and (type(self.capacity) is not int or self.capacity < 1):
            raise InputError(f"cache capacity must be a whole number of experts, at least 1, got {self.capacity!r}")
        for name in ("pin_memory", "side_stream", "host_tier", "unified", "prefetch"):
            if type(getattr(self, name)) is not bool:
                raise InputError(f"cache option {name} must be true or false, got {getattr(self, name)!r}")
        if not any(self.in_place_misses is v for v in (None, True, False)):  # not ==: 1 == True
            raise InputError(f"cache option in_place_misses must be true, false or null, got {self.in_place_misses!r}")


def _quant_scheme(spans: dict[int, list]) -> tuple[int, int] | None:
    """(bits, group_size) of the slots: the scheme every expert file shares, or None for 16-bit ones. With
    precision by popularity (int8 hot experts beside int4 ones, one group size) the slots hold int8, and an
    int4 expert is widened to it as it is copied in."""
    schemes = {(s.bits, s.group_size) for layer_spans in spans.values() for s in layer_spans}
    groups = {g for _, g in schemes}
    if {b for b, _ in schemes} == {8, 4} and len(groups) == 1:
        schemes = {(8, groups.pop())}
    if len(schemes) > 1:
        raise InputError(f"the layer files mix quantization schemes {sorted(schemes)}: give them one (bits, group)")
    bits, group = schemes.pop() if schemes else (16, 0)
    if bits != 16 and not all(s.in_slot_order for layer_spans in spans.values() for s in layer_spans):
        raise InputError("quantized layer files must keep each expert's qweights then scales back to back")
    return None if bits == 16 else (bits, group)


class ExpertCache:
    """`get(layer, expert)` returns that expert's (gate [I,H], up [I,H], down [H,I]) on `device` in `dtype`,
    views into its slot (valid until a later miss reuses the slot); `get_many` makes several resident at
    once; `slabs(layer)` gives the kernels the slabs and the layer's slot table."""

    def __init__(self, layer_files: dict[int, str | Path], layout: Layout, options: CacheOptions = CacheOptions(),
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 experts_per_token: int | None = None):
        self.options, self.device, self.dtype = options, torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.unified = options.unified
        # unified: every expert stays where it was read (no second copy in a host tier)
        self.files = ExpertFiles(layer_files, layout, experts_per_token, staging=cuda and options.pin_memory,
                                 host_tier=options.host_tier and not self.unified, pinned=cuda)
        self.spans = self.files.spans
        k = self.files.experts_per_token
        most = max((len(s) for s in self.spans.values()), default=0)
        self.capacity = most if self.unified or options.capacity is None else options.capacity
        self.scope = "per_layer" if self.unified else options.scope
        if k is not None and self.capacity < k:
            raise InputError(f"cache capacity {self.capacity} is below experts_per_token {k}: "
                             f"one token needs {k} experts of a layer")
        shapes = {L: (len(s), s[0].weight_shape(0), s[0].weight_shape(2)) for L, s in self.spans.items()}
        self.quant = _quant_scheme(self.spans)
        self.slots = Slots(shapes, self.capacity, self.scope, self.device, dtype, self.unified, self.quant)
        self.residency = Residency(self.slots, options.policy, self.scope, self.capacity)
        self._stream = torch.cuda.Stream(self.device) if cuda and options.side_stream else None
        # router lookahead: predicted experts copied on a stream of their own while the GPU computes; only
        # from the host tier (a file read would block the host, which is the decode step's critical path)
        self.prefetches = options.prefetch and options.host_tier and not self.unified
        self.prefetch_stream = torch.cuda.Stream(self.device) if cuda and self.prefetches else None
        self.load_stream = torch.cuda.Stream(self.device) if cuda else None  # see load_ahead
        self._prefetched: set[tuple[int, int]] = set()  # loaded ahead, not yet asked for
        self.reset_stats()
        if self.unified:
            for layer, spans in self.spans.items():
                self.get_many(layer, list(range(len(spans))))
        self.reset_stats()  # the start's reads are not the run's misses
        if options.in_place_misses is not False and options.host_tier and not self.unified \
                and options.policy == "lru" and self.scope == "per_layer" and not self.prefetches:
            offsets = {L: self.files.host_offsets(L) for L in self.spans}
            if all(o is not None for o in offsets.values()):
                self.residency.use_device_lru(
                    offsets, {L: self.files.host_elements(L, s[0].dtype) for L, s in self.spans.items()})
        if options.in_place_misses and self.device_lru is None:
            raise InputError("in-place misses need the host tier, an LRU per-layer cache, no prefetch, and experts "
                             "stored gate, up, down back to back, all at one precision")

    # ---- what the model and the decode strategies ask ----------------------------------------------------

    @property
    def bits(self) -> int:
        """16, or the bits of the quantized experts the cache holds."""
        return 16 if self.quant is None else self.quant[0]

    @property
    def stored_bits(self) -> tuple[int, int | None]:
        """(bits of the experts as their files store them, bits of the hot ones or None): (4, 8) with
        precision by popularity, where `bits` (the slots') is 8."""
        stored = {s.bits for spans in self.spans.values() for s in spans}
        return (min(stored), max(stored)) if len(stored) > 1 else (stored.pop() if stored else 16, None)

    def quant_slabs(self, layer: int):
        """(s1, s2, bits, group_size) of quantized experts beside `slabs(layer)`, or None (16-bit)."""
        return self.slots.quant_slabs(layer)

    @property
    def keeps_step_resident(self) -> bool:
        """With LRU and capacity >= top-k, no access of a step evicts another expert of the same step
        (they are the most recent), so a step may gather all its experts after loading them."""
        return self.options.policy == "lru"

    @property
    def device_lru(self):
        return self.residency.device_lru

    @property
    def slot(self) -> dict[tuple[int, int], int]:
        """Resident (layer, expert) -> its slot."""
        self.residency.to_host()
        return self.residency.slot

    def slabs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [S, 2I, H], w2 [S, H, I], table [E]): w1[table[e]] is expert e's gate and up."""
        return self.slots.slabs(layer)

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.get_many(layer, [expert])
        return self.slots.views(layer, self.residency.slot[(layer, expert)])

    @property
    def loads_overlap(self) -> bool:
        """load_ahead's copies run beside the compute (CUDA's load stream), not in line with it."""
        return self.load_stream is not None

    def load_ahead(self, layer: int, experts: list[int]) -> None:
        """`get_many`, with the misses copied on the load stream once the compute stream's queued work (which
        may read the slots they take) is done, so that they overlap what the compute stream runs next;
        `wait_loads` before reading them. Off CUDA it is get_many."""
        if self.load_stream is None:
            return self.get_many(layer, experts)
        self.load_stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.prefetch_stream is not None:
            self.load_stream.wait_stream(self.prefetch_stream)
        self.get_many(layer, experts, self.load_stream)

    def wait_loads(self) -> None:
        """The compute stream waits for what load_ahead copied."""
        if self.load_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.load_stream)

    def get_many(self, layer: int, experts: list[int], stream=None) -> None:
        """Make `experts` of `layer` resident, deciding hits and evictions in order exactly as that many
        `get` calls would, then reading the misses' bytes in parallel (on `stream`: see load_ahead). With
        LRU (keeps_step_resident) none of them evicts another; with another policy, call `get` one expert
        at a time."""
        if layer not in self.spans:
            raise InputError(f"no expert file was given for layer {layer}")
        misses = []
        for expert in experts:
            if not 0 <= expert < len(self.spans[layer]):
                raise InputError(f"layer {layer} has experts 0..{len(self.spans[layer]) - 1}, asked for {expert}")
            hit, evicted = self.residency.admit(layer, expert)
            self.evictions += evicted is not None
            self._prefetched.discard(evicted)
            if hit:
                self.hits += 1
                if (layer, expert) in self._prefetched:  # a miss the lookahead hid
                    self._prefetched.discard((layer, expert))
                    self.prefetch_used += 1
                continue
            self.misses += 1
            misses.append(expert)
        if misses:
            self._load_all(layer, misses, stream)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Load the absent ones of `experts` (predicted for `layer`) on the prefetch stream, as the most
        recent keys of the policy, counting neither hits nor misses; `wait_prefetch` before reading them."""
        if not self.prefetches or layer not in self.spans:
            return
        absent = [e for e in dict.fromkeys(experts) if not self.residency.is_resident(layer, e)]
        for expert in absent:
            _, evicted = self.residency.admit(layer, expert)
            self.evictions += evicted is not None
            self._prefetched.discard(evicted)
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

    def is_resident(self, layer: int, expert: int) -> bool:
        return self.residency.is_resident(layer, expert)

    def holds_every_expert(self) -> bool:
        """Every expert of every layer is resident: nothing can miss."""
        return self.residency.count() == sum(len(spans) for spans in self.spans.values())

    def resident_count(self) -> int:
        return self.residency.count()

    def to_device(self) -> None:
        """Hand the policy to the device's LRU (before decode steps that read misses in place)."""
        self.residency.to_device()

    def count_step(self, layer: int, experts: list[int], outcomes: list[float]) -> None:
        """A step's experts of `layer` as the device's LRU served them (outcome 0 hit, 1 miss, 2 miss that
        evicted): the counters the host would have kept."""
        for expert, outcome in zip(experts, outcomes):
            if outcome == 0:
                self.hits += 1
                continue
            self.misses += 1
            self.evictions += outcome == 2
            self.bytes_loaded += self.spans[layer][expert].nbytes

    # ---- counters and sizes ------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.bytes_loaded = 0
        self.prefetched = self.prefetch_used = 0  # experts loaded ahead; of them, asked for before eviction
        self.load_seconds = 0.0

    def stats(self) -> dict:
        accesses = self.hits + self.misses
        return {**{name: getattr(self, name) for name in COUNTERS},
                "hit_rate": self.hits / accesses if accesses else 0.0}

    def expert_bytes(self, layer: int, expert: int) -> int:
        return self.spans[layer][expert].nbytes

    @property
    def slot_count(self) -> int:
        """Experts the cache can hold, over all its pools."""
        return self.slots.count

    @property
    def bytes_per_expert(self) -> int:
        """One expert as a slot holds it: in the compute dtype, or quantized (qweights and scales)."""
        return self.slots.nbytes // self.slots.count

    @property
    def slab_bytes(self) -> int:
        """The memory the cache holds for experts: every slot, preallocated (host RAM when unified)."""
        return self.slots.nbytes

    @property
    def host_tier_bytes(self) -> int:
        return self.files.host_tier_bytes

    # ---- loading -----------------------------------------------------------------------------------------

    def _load_all(self, layer: int, experts: list[int], stream=None) -> None:
        start = time.perf_counter()
        for expert, raw, buffer in self.files.read(layer, experts):
            self._load(layer, expert, raw, buffer, stream)
        self.slots.push()
        self.bytes_loaded += sum(self.spans[layer][e].nbytes for e in experts)
        self.load_seconds += time.perf_counter() - start

    def _load(self, layer: int, expert: int, raw: torch.Tensor, buffer: int | None, stream=None) -> None:
        """One expert's bytes (`raw`, in staging buffer `buffer` or None) into its slot, cast to the compute
        dtype; on `stream` (a prefetch, a load ahead: its caller has ordered it) or the cache's own."""
        span, slot = self.spans[layer][expert], self.residency.slot[(layer, expert)]
        write = (layer, slot, raw, span.parts, span.dtype, span.in_slot_order, span.bits)
        if not self.slots.pools[self.slots.pool_id(layer)][0].is_cuda:  # the CPU, or a unified slab in host RAM
            self.slots.write(*write)
            self.residency.placed(layer, expert)
            return
        main = torch.cuda.current_stream(self.device)
        if stream is None:
            # a prefetch in flight may be writing the slot this load was given: it lands first
            self.wait_prefetch()
            stream = self._stream or main
        if self._stream is not None and stream is self._stream:
            stream.wait_stream(main)  # the slot's previous expert may still be read by queued kernels
        with torch.cuda.stream(stream):
            self.slots.write(*write)
            self.files.release(buffer, stream)
        if stream is self._stream:
            main.wait_stream(self._stream)
        self.residency.placed(layer, expert)

    def close(self, wait: bool = True) -> None:
        self.files.close(wait)

    def __del__(self):
        try:
            self.close(wait=False)  # the read threads exit on their own: see ExpertFiles.close
        except Exception:
            pass
