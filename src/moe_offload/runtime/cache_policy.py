"""Replacement policies for the expert cache, shared by the runtime cache and the offline simulator.

A policy only decides: `access(key)` says whether `key` was resident and which key, if any, it evicted
to make room. The runtime `ExpertCache` keeps the tensors; the simulator keeps nothing but counts. Using
the same objects in both is what makes a simulated hit rate the runtime's hit rate.

Keys are (layer, expert). Scope `per_layer` gives each layer its own `capacity` slots; `global` gives all
layers one pool of `capacity` slots.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Hashable

Key = tuple[int, int]


class LRU:
    """Evict the least recently used resident."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def access(self, key) -> tuple[bool, Hashable | None]:
        if key in self._order:
            self._order.move_to_end(key)
            return True, None
        evicted = None
        if len(self._order) >= self.capacity:
            evicted, _ = self._order.popitem(last=False)
        self._order[key] = None
        return False, evicted

    def order(self) -> list:
        """The resident keys, least recently used first."""
        return list(self._order)

    def restore(self, keys) -> None:
        """Make `keys` (least recently used first) the residents: the state another copy of this policy
        reached (the decode step's copy on the GPU, see runtime.residency)."""
        self._order = OrderedDict((key, None) for key in keys)


class LFU:
    """Evict the resident used least often so far (counting every access since the start, resident or
    not); ties go to the least recently used. A heap with lazy deletion keeps eviction O(log n), which
    matters for global pools of thousands of experts."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._count: dict[Hashable, int] = {}
        self._last: dict[Hashable, int] = {}  # resident key -> tick of its latest access
        self._heap: list[tuple[int, int, Hashable]] = []  # (count, tick, key); stale entries skipped
        self._tick = 0

    def access(self, key) -> tuple[bool, Hashable | None]:
        self._tick += 1
        self._count[key] = self._count.get(key, 0) + 1
        hit = key in self._last
        evicted = None
        if not hit and len(self._last) >= self.capacity:
            while True:
                count, tick, victim = heapq.heappop(self._heap)
                if self._last.get(victim) == tick and self._count[victim] == count:
                    break
            del self._last[victim]
            evicted = victim
        self._last[key] = self._tick
        heapq.heappush(self._heap, (self._count[key], self._tick, key))
        if len(self._heap) > 4 * self.capacity + 64:  # drop stale entries now and then
            self._heap = [(self._count[k], t, k) for k, t in self._last.items()]
            heapq.heapify(self._heap)
        return hit, evicted


ONLINE_POLICIES = {"lru": LRU, "lfu": LFU}


class Scoped:
    """Applies a policy per layer or over one global pool, on (layer, expert) keys."""

    def __init__(self, policy: str, scope: str, capacity: int):
        if policy not in ONLINE_POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} (known: {', '.join(ONLINE_POLICIES)})")
        if scope not in ("per_layer", "global"):
            raise ValueError(f"unknown cache scope {scope!r} (per_layer or global)")
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.policy, self.scope, self.capacity = policy, scope, capacity
        self._pools: dict[int | None, object] = {}

    def access(self, key: Key) -> tuple[bool, Key | None]:
        return self.pool(key[0]).access(key)

    def pool(self, layer: int):
        """The policy that `layer`'s keys go through (created empty if none has been accessed)."""
        pool_id = layer if self.scope == "per_layer" else None
        if pool_id not in self._pools:
            self._pools[pool_id] = ONLINE_POLICIES[self.policy](self.capacity)
        return self._pools[pool_id]


# Prompt tokens per forward (runtime.generate): a prompt's chunks each run through every layer before the
# next, so they are separate steps of the access order (analysis.cache_sim.access_sequence). 16384: a 32k
# prompt at the real dims prefilled 1.4% faster than in chunks of 8192 on an H100 (one later chunk to merge,
# not three; benchmarks/results/context_sweep_h100_48x16_32k_chunk*.json), for about 2 GB of a chunk's MoE
# activations (the pairs' inputs, gate/up and products) instead of 1.
PREFILL_CHUNK = 16384


def step_accesses(chosen: list[list[int]]) -> list[int]:
    """The order in which one forward step touches one layer's experts: each expert any token chose,
    once, ascending. The runtime loads in this order and the simulator replays traces in it."""
    return sorted({e for token in chosen for e in token})
