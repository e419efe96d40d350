"""The expert cache's LRU kept on the GPU, so that a decode step with misses stays one graph replay.

With every expert in the host tier (pinned RAM), a one-token step need not show its routing to the host
before its experts run. Each MoE layer's route kernel gives every absent expert the layer's least
recently used slot that the step does not hold; the expert kernels read that expert from the host tier
in place and write it into the slot as they go. A miss then costs one transfer of its bytes, inside the
step, and the host never stops the GPU: it only counts hits and misses and writes the trace, from the
routing record it reads after the step (rows: experts, weights, outcomes).

While decode runs, the slot tables, slot owners and recency stamps here are the cache's truth; `pull`
gives them back to the host's policy (`Scoped`) before the host decides anything itself (a prefill, a
careful step), and `push` hands the host's state over before the next graph step. The stamps order a
step's experts as the host's LRU touches them (ascending, `step_accesses`), so both evict the same keys
and the offline simulator's hit rate is still this cache's.
"""

from __future__ import annotations

import torch

from .expert_files import ExpertSpan

ALIGN = 16  # elements: the kernels promise the compiler that host-tier offsets are multiples of this


def in_slot_order(span: ExpertSpan) -> bool:
    """gate, up and down stored back to back in that order, as a slot holds them (w1 = gate then up rows)."""
    (g0, g1, _), (u0, u1, _), (d0, _, _) = span.parts
    return g0 == 0 and u0 == g1 and d0 == u1


def host_offsets(spans: list[ExpertSpan], start: int) -> list[int] | None:
    """Each expert's element offset in its layer's host-tier buffer (whose byte 0 is file offset
    `start`), or None when the kernels cannot read the experts there in place: parts out of slot order,
    or an offset (of gate or of down) that is not a multiple of ALIGN elements."""
    out = []
    for span in spans:
        size = span.dtype.itemsize
        offset, rest = divmod(span.offset - start, size)
        down = span.parts[2][0]
        if not in_slot_order(span) or rest or offset % ALIGN or down % ALIGN:
            return None
        out.append(offset)
    return out


class DevicePolicy:
    """Per layer: owner [S] (the expert in each slot, -1 if free) and stamp [S] (recency, -1 if free) on
    the device, beside the cache's slot table [E]; the host tier as elements and each expert's offset in
    it; and a step clock the decode step advances."""

    def __init__(self, cache, offsets: dict[int, list[int]]):
        self.cache = cache
        dev = cache.device
        self.clock = torch.zeros(1, dtype=torch.long, device=dev)
        self.owner, self.stamp, self.offsets, self.host = {}, {}, {}, {}
        for layer, offs in offsets.items():
            slots = cache.slabs(layer)[0].shape[0]
            self.owner[layer] = torch.full((slots,), -1, dtype=torch.long, device=dev)
            self.stamp[layer] = torch.full((slots,), -1, dtype=torch.long, device=dev)
            self.offsets[layer] = torch.tensor(offs, dtype=torch.long, device=dev)
            self.host[layer] = cache.files.host_elements(layer, cache.spans[layer][0].dtype)

    def args(self, layer: int):
        """What the route kernel needs for `layer`: (owner, stamp, clock, host offsets)."""
        return self.owner[layer], self.stamp[layer], self.clock, self.offsets[layer]

    def tick(self) -> None:
        """The step is over: its stamps are older than the next step's."""
        self.clock.add_(1)

    def push(self) -> None:
        """The host's residents, slots and recency onto the device (tables are kept in step already)."""
        cache = self.cache
        cache.push_tables()
        most = 0
        for layer in self.owner:
            owner = torch.full(self.owner[layer].shape, -1, dtype=torch.long)
            stamp = torch.full(owner.shape, -1, dtype=torch.long)
            keys = cache.policy.pool(layer).order()
            for rank, key in enumerate(keys):
                owner[cache.slot[key]], stamp[cache.slot[key]] = key[1], rank
            self.owner[layer].copy_(owner)
            self.stamp[layer].copy_(stamp)
            most = max(most, len(keys))
        self.clock.fill_(most + 1)  # a step's stamps are clock * k + rank: above every pushed rank

    def pull(self) -> None:
        """The device's residents, slots and recency back into the host's cache and policy."""
        cache = self.cache
        for layer in self.owner:
            owner, stamp = self.owner[layer].tolist(), self.stamp[layer].tolist()
            for key in [k for k in cache.slot if k[0] == layer]:
                del cache.slot[key]
            held = sorted((s for s in range(len(owner)) if owner[s] >= 0), key=lambda s: stamp[s])
            for s in held:
                cache.slot[(layer, owner[s])] = s
            cache.policy.pool(layer).restore([(layer, owner[s]) for s in held])
            free = cache.free_slots(layer)
            free[:] = [s for s in range(len(owner) - 1, -1, -1) if owner[s] < 0]
            cache.pull_table(layer)
