"""Which expert of which layer sits in which slot: the only writer of slot state.

On the host the decision is the policy's (`cache_policy.Scoped`, the object the offline simulator replays
traces with, so a simulated hit rate is this cache's hit rate), beside a map key -> slot and each pool's
free slots. With in-place misses a copy of the LRU lives on the GPU (`DeviceLRU`): each MoE layer's route
kernel gives an absent expert the layer's least recently used slot that the step does not hold, and the
expert kernels read it from the host tier in place and write it into that slot, so a decode step with
misses stays one graph replay. While decode steps run that way the device's copy is the truth;
`to_host` takes its state back before the host decides anything itself (a prefill, a careful step), and
`to_device` hands the host's state over before the next graph step. The device orders a step's experts as
the host's LRU touches them (ascending, `step_accesses`), so both evict the same keys.
"""

from __future__ import annotations

import torch

from .cache_policy import Key, Scoped
from .slots import Slots


class DeviceLRU:
    """Per layer on the device: owner [S] (the expert in each slot, -1 if free) and stamp [S] (recency, -1 if
    free), beside the slot table; each expert's offset in the host tier, the host tier itself (as elements),
    and a step clock the decode step advances."""

    def __init__(self, slots: Slots, offsets: dict[int, list[int]], host: dict[int, torch.Tensor]):
        dev = slots.device
        self.clock = torch.zeros(1, dtype=torch.long, device=dev)
        self.host = host
        self.owner, self.stamp, self.offsets = {}, {}, {}
        for layer, offs in offsets.items():
            self.owner[layer] = torch.full((slots.size(layer),), -1, dtype=torch.long, device=dev)
            self.stamp[layer] = torch.full((slots.size(layer),), -1, dtype=torch.long, device=dev)
            self.offsets[layer] = torch.tensor(offs, dtype=torch.long, device=dev)

    def args(self, layer: int):
        """What the route kernel needs for `layer`: (owner, stamp, clock, host offsets)."""
        return self.owner[layer], self.stamp[layer], self.clock, self.offsets[layer]

    def tick(self) -> None:
        """The step is over: its stamps are older than the next step's."""
        self.clock.add_(1)


class Residency:
    def __init__(self, slots: Slots, policy: str, scope: str, capacity: int):
        self.slots = slots
        self.policy = Scoped(policy, scope, capacity)
        self.slot: dict[Key, int] = {}
        self.free = {pool: list(range(w1.shape[0] - 1, -1, -1)) for pool, (w1, _) in slots.pools.items()}
        self.device_lru: DeviceLRU | None = None
        self.on_device = False

    def use_device_lru(self, offsets: dict[int, list[int]], host: dict[int, torch.Tensor]) -> None:
        self.device_lru = DeviceLRU(self.slots, offsets, host)

    def admit(self, layer: int, expert: int) -> tuple[bool, Key | None]:
        """The policy's access to (layer, expert): (hit, the key evicted for it or None). On a miss the key
        has a slot now; its table entry waits for `placed` (the bytes are not there yet)."""
        self.to_host()
        key = (layer, expert)
        hit, evicted = self.policy.access(key)
        if hit:
            return True, None
        free = self.free[self.slots.pool_id(layer)]
        if evicted is not None:
            free.append(self.slot.pop(evicted))
            self.slots.set(*evicted, -1)
        self.slot[key] = free.pop()
        return False, evicted

    def placed(self, layer: int, expert: int) -> None:
        """The expert's bytes are in its slot: the table says so."""
        self.slots.set(layer, expert, self.slot[(layer, expert)])

    def is_resident(self, layer: int, expert: int) -> bool:
        self.to_host()
        return (layer, expert) in self.slot

    def count(self) -> int:
        self.to_host()
        return len(self.slot)

    def to_device(self) -> None:
        """The host's residents, slots and recency onto the device's LRU (tables are kept in step already)."""
        lru = self.device_lru
        if lru is None or self.on_device:
            return
        self.slots.push()
        most = 0
        for layer in lru.owner:
            owner = torch.full(lru.owner[layer].shape, -1, dtype=torch.long)
            stamp = torch.full(owner.shape, -1, dtype=torch.long)
            keys = self.policy.pool(layer).order()
            for rank, key in enumerate(keys):
                owner[self.slot[key]], stamp[self.slot[key]] = key[1], rank
            lru.owner[layer].copy_(owner)
            lru.stamp[layer].copy_(stamp)
            most = max(most, len(keys))
        lru.clock.fill_(most + 1)  # a step's stamps are clock * k + rank: above every pushed rank
        self.on_device = True

    def to_host(self) -> None:
        """The device LRU's residents, slots and recency back into the host's map, policy and tables."""
        if not self.on_device:
            return
        self.on_device = False
        lru = self.device_lru
        for layer in lru.owner:
            owner, stamp = lru.owner[layer].tolist(), lru.stamp[layer].tolist()
            for key in [k for k in self.slot if k[0] == layer]:
                del self.slot[key]
            held = sorted((s for s in range(len(owner)) if owner[s] >= 0), key=lambda s: stamp[s])
            for s in held:
                self.slot[(layer, owner[s])] = s
            self.policy.pool(layer).restore([(layer, owner[s]) for s in held])
            self.free[self.slots.pool_id(layer)] = [s for s in range(len(owner) - 1, -1, -1) if owner[s] < 0]
            self.slots.pull(layer)
