"""The optimistic one-token step as two CUDA graphs that feed each other, so the GPU never waits for the host.

Graph k reads its token and position from ids[k] and pos[k] and writes its greedy token and the next
position into ids[1 - k] and pos[1 - k]: graph 1 - k can be launched before the host has seen graph k's
result (the decode loop's "pipelined" path), and the host work of one step (reading its routing,
settling the cache, the trace) overlaps the GPU's next step. Each launch also starts the copies of the
step's routing and token to pinned host memory that `wait` returns. Off CUDA the same steps are plain
calls, so the loop's logic runs (and is tested) on the CPU too.
"""

from __future__ import annotations

import torch

from .layer_graphs import capture


class StepGraphs:
    def __init__(self, model):
        self.model = model
        self.kv_version = model._kv_version
        dev = model.embed.device
        self.cuda = dev.type == "cuda"
        moe_layers = sum(hasattr(b.mlp, "route_fused") for b in model.layers)
        self.ids = [torch.zeros(1, 1, dtype=torch.long, device=dev) for _ in range(2)]
        self.pos = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(2)]
        rows = 3 if model.in_place else 2  # experts, weights (and outcomes: see Transformer._optimistic_fused)
        self.host_routing = [torch.zeros(moe_layers, rows, model.cfg.experts_per_token, pin_memory=self.cuda)
                             for _ in range(2)]
        self.host_token = [torch.zeros(1, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.graphs = [None, None]
        self.out = [None, None]  # graph k's (logits [1, 1, V], each layer's input, MoE layers, routing)

    def _step(self, k: int):
        logits, inputs, (layers, routing) = self.model.optimistic_step(self.ids[k], self.pos[k])
        self.ids[1 - k].view(-1).copy_(logits.view(-1).argmax())  # first maximum, as argmax(dim=-1)
        torch.add(self.pos[k], 1, out=self.pos[1 - k])
        return logits, inputs, layers, routing

    def launch(self, k: int, tok: torch.Tensor | None = None, position: int | None = None) -> None:
        """Start graph k: from `tok` at `position`, or (None) from what graph 1 - k wrote."""
        if tok is not None:
            self.ids[k].view(-1).copy_(tok.view(-1))
            self.pos[k].fill_(position)
        if not self.cuda:
            self.out[k] = self._step(k)
        elif self.graphs[k] is None:
            # Captured at its first launch. The warm-up computes this very step, so its results are this
            # step's and the graph is not replayed now: a step must run once, since with in-place misses
            # it also moves the cache's policy on the device.
            self.graphs[k], self.out[k], warm = capture(lambda: self._step(k))
            _copy_into(self.out[k], warm)
        else:
            self.graphs[k].replay()
        routing = self.out[k][3]
        if routing is not None:
            self.host_routing[k].copy_(routing, non_blocking=True)
        self.host_token[k].copy_(self.ids[1 - k].view(-1), non_blocking=True)
        if self.cuda:
            self.events[k].record()

    def wait(self, k: int) -> tuple[list, int]:
        """Graph k's routing ([MoE layers][2][k], on the host) and greedy token, once it has run."""
        if self.cuda:
            self.events[k].synchronize()
        return self.host_routing[k].tolist(), int(self.host_token[k])


def _copy_into(dst, src) -> None:
    """The tensors of src into those of dst, the same nested structure (lists, tuples, tensors, ints)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
