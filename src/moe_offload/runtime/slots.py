"""Slabs of expert slots and the tables that say which slot holds which expert.

A pool (one per layer, or one for all layers) is two preallocated slabs: w1 [S, 2I, H] (each slot's gate
rows, then its up rows) and w2 [S, H, I] (its down), so the memory held is the capacity times one expert
from the start, and the kernels read a slot in place. Each layer's table [E] gives each expert's slot
(-1: absent); the host keeps its own copy and pushes a changed table to the device in one copy (a
scalar write into a device tensor would be a pageable copy and a host sync per miss). Which expert
goes where is residency.py's decision; this module only holds the bytes and the tables.

Quantized experts (checkpoint.quantize) keep their stored form in the slots: w1 [S, 2I, H * bits / 8] and
w2 [S, H, I * bits / 8] of int8 or packed int4, beside their float16 scales s1 [S, 2I, H / G] and
s2 [S, H, I / G]; the kernels dequantize in registers, so no 16-bit copy of an expert is ever held. With
precision by popularity the slots are int8, and an int4 expert's values are widened into one (exactly).
"""

from __future__ import annotations

import torch

from ..checkpoint.quantize import dequantize, unpack


class Slots:
    """shapes: layer -> (experts, (I, H) of gate, (H, I) of down). unified: the slabs in pinned host RAM,
    which the GPU reads in place (unified-memory machines). quant: (bits, group_size) of quantized
    experts, or None (16-bit: the slabs hold them in the compute dtype)."""

    def __init__(self, shapes: dict[int, tuple[int, tuple, tuple]], capacity: int, scope: str, device: torch.device,
                 dtype: torch.dtype, unified: bool = False, quant: tuple[int, int] | None = None):
        self.device, self.dtype, self.scope, self.quant = device, dtype, scope, quant
        self.pools: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scales: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}  # quantized: s1, s2 per pool
        self.tables: dict[int, torch.Tensor] = {}  # layer -> [E] on the device
        self.host_tables: dict[int, torch.Tensor] = {}  # ... as the host writes them (on the CPU: the same)
        self._host_entries = {}  # ... as numpy views of the same memory: a scalar write costs 0.1 us, not 1.5
        self._changed: set[int] = set()
        where = dict(device="cpu", pin_memory=device.type == "cuda") if unified else dict(device=device)
        total = sum(n for n, _, _ in shapes.values())
        for layer, (n, (i, h), down) in shapes.items():
            pool = self.pool_id(layer)
            if pool not in self.pools:  # every slab now: the memory held is the bound, from the start
                size = min(capacity, total if pool is None else n)
                if quant is None:
                    self.pools[pool] = (torch.empty(size, 2 * i, h, dtype=dtype, **where),
                                        torch.empty(size, *down, dtype=dtype, **where))
                else:
                    bits, group = quant
                    stored = torch.int8 if bits == 8 else torch.uint8
                    self.pools[pool] = (torch.empty(size, 2 * i, h * bits // 8, dtype=stored, **where),
                                        torch.empty(size, h, i * bits // 8, dtype=stored, **where))
                    self.scales[pool] = (torch.empty(size, 2 * i, h // group, dtype=torch.float16, **where),
                                         torch.empty(size, h, i // group, dtype=torch.float16, **where))
            self.host_tables[layer] = torch.full((n,), -1, dtype=torch.long)
            self.tables[layer] = self.host_tables[layer].to(device)
            self._host_entries[layer] = self.host_tables[layer].numpy()

    def pool_id(self, layer: int) -> int | None:
        return layer if self.scope == "per_layer" else None

    def size(self, layer: int) -> int:
        """Slots of `layer`'s pool."""
        return self.pools[self.pool_id(layer)][0].shape[0]

    @property
    def count(self) -> int:
        """Slots over all pools."""
        return sum(w1.shape[0] for w1, _ in self.pools.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for pools in (self.pools, self.scales) for pair in pools.values() for t in pair)

    def slabs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [S, 2I, H], w2 [S, H, I], table [E]): w1[table[e]] is expert e's gate and up."""
        w1, w2 = self.pools[self.pool_id(layer)]
        return w1, w2, self.tables[layer]

    def quant_slabs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """Quantized experts: (s1 [S, 2I, H / G], s2 [S, H, I / G], bits, group_size) beside `slabs`; else None."""
        if self.quant is None:
            return None
        return (*self.scales[self.pool_id(layer)], *self.quant)

    def views(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot's (gate [I, H], up [I, H], down [H, I]) in the compute dtype (quantized: dequantized now)."""
        w1, w2 = self.pools[self.pool_id(layer)]
        if self.quant is not None:
            s1, s2 = self.scales[self.pool_id(layer)]
            w1, w2 = (dequantize(w[slot], s[slot], self.quant[0], self.dtype) for w, s in ((w1, s1), (w2, s2)))
            slot = slice(None)
        i = w1.shape[-2] // 2
        return w1[slot, :i], w1[slot, i:], w2[slot]

    def set(self, layer: int, expert: int, slot: int) -> None:
        """Expert's slot in the host's table (-1: absent); on the device at the next `push`."""
        self._host_entries[layer][expert] = slot
        self._changed.add(layer)

    def push(self) -> None:
        """The changed layers' tables to the device, each in one copy queued on the current stream (from a
        pinned snapshot, which the caching host allocator keeps until the copy is done)."""
        for layer in self._changed:
            if self.tables[layer] is not self.host_tables[layer]:
                self.tables[layer].copy_(self.host_tables[layer].pin_memory(), non_blocking=True)
        self._changed.clear()

    def pull(self, layer: int) -> None:
        """The host's copy of `layer`'s table from the device's (after the device's LRU wrote it)."""
        if self.tables[layer] is not self.host_tables[layer]:
            self.host_tables[layer].copy_(self.tables[layer])

    def write(self, layer: int, slot: int, raw: torch.Tensor, parts, storage: torch.dtype, in_slot_order: bool,
              bits: int = 16) -> None:
        """An expert's stored bytes `raw` (parts: each projection's (start, end, shape) in elements of the
        storage dtype; bits: how it is stored) into `slot`, cast to the compute dtype, on the current stream."""
        w1, w2 = self.pools[self.pool_id(layer)]
        non_blocking = raw.is_pinned()
        if self.quant is not None:  # the stored bytes as they are: qweights of gate and up, of down, then scales
            s1, s2 = self.scales[self.pool_id(layer)]
            targets = (w1[slot], w2[slot], s1[slot], s2[slot])
            bounds = (parts[0][0], parts[1][1], parts[2][1], parts[4][1], parts[5][1])
            for j, (dst, a, b) in enumerate(zip(targets, bounds, bounds[1:])):
                if j < 2 and bits != self.quant[0]:  # an int4 expert in int8 slots: its values widened, exact
                    src = raw[a:b].to(dst.device, non_blocking=non_blocking)
                    dst.copy_(unpack(src.view(dst.shape[0], -1), bits))
                else:
                    dst.view(-1).view(torch.uint8).copy_(raw[a:b], non_blocking=non_blocking)
            return
        if w1.is_cuda and storage == self.dtype and in_slot_order:
            # stored as computed and in slot order: two DMAs straight into the slot, no copies on the device
            n1 = w1[slot].numel() * storage.itemsize
            for dst, src in ((w1[slot], raw[:n1]), (w2[slot], raw[n1:])):
                dst.view(-1).view(torch.uint8).copy_(src, non_blocking=non_blocking)
            return
        if w1.is_cuda:  # the stored bytes to the device (bf16: half those of f32), cast there
            raw = raw.to(self.device, non_blocking=non_blocking)
        flat = raw.view(storage)
        if in_slot_order:  # gate and up as w1's rows, then down: two copies, each cast as it goes
            gate_up, down = w1.view(w1.shape[0], -1)[slot], w2.view(w2.shape[0], -1)[slot]
            gate_up.copy_(flat[:gate_up.numel()])
            down.copy_(flat[gate_up.numel(): gate_up.numel() + down.numel()])
            return
        for target, (a, b, shape) in zip(self.views(layer, slot), parts):
            target.copy_(flat[a:b].view(shape))
