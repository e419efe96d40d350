"""CUDA graphs of the decode step: the whole token (StepGraphs), or each layer's halves (LayerGraphs).

A graph holds the addresses of the buffers it was captured with, so each is tied to one allocation of the
KV cache (`kv_version`); the strategy that owns it captures again after a reallocation. Graphs are
captured the first time they run, on real data: the capture's eager warm-up is that step's computation,
so it writes exactly what the step writes.
"""

from __future__ import annotations

import torch


def capture(fn, pool=None):
    """Run fn once eagerly on a side stream (compiles kernels, writes what the step writes), then capture
    it into a graph sharing `pool` (None: a pool of its own). Returns (graph, fn's outputs, which the graph
    rewrites, and the eager run's outputs)."""
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        warm = fn()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out, warm


def _copy_into(dst, src) -> None:
    """The tensors of src into those of dst, the same nested structure (lists, tuples, tensors)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


class StepGraphs:
    """The optimistic step (fused_step.FusedStep.optimistic) as two graphs that feed each other.

    Graph k reads its token and position from ids[k] and pos[k] and writes the token it picks (greedy or
    sampled: the sampler runs inside the graph) and the next
    position into ids[1 - k] and pos[1 - k]: graph 1 - k can be launched before the host has seen graph
    k's result (decode.Pipelined), and the host work of one step overlaps the GPU's next. Each launch also
    starts the copies of the step's routing and token to pinned host memory that `wait` returns. Off CUDA
    the same steps are plain calls, so the strategies' logic runs (and is tested) on the CPU too."""

    def __init__(self, step, kv_version: int, sampler):
        self.step, self.kv_version, self.sampler = step, kv_version, sampler
        dev = step.model.embed.device
        self.cuda = dev.type == "cuda"
        self.ids = [torch.zeros(1, 1, dtype=torch.long, device=dev) for _ in range(2)]
        self.pos = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(2)]
        shape = (len(step.moe_layers), step.routing_rows(), step.cfg.experts_per_token)
        self.host_routing = [torch.zeros(shape, pin_memory=self.cuda) for _ in range(2)]
        self.host_token = [torch.zeros(1, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.graphs = [None, None]
        self.out = [None, None]  # graph k's (logits [1, 1, V], each layer's input, routing)

    def _step(self, k: int):
        logits, inputs, routing = self.step.optimistic(self.ids[k], self.pos[k])
        self.ids[1 - k].view(-1).copy_(self.sampler(logits.view(1, -1), self.pos[k]))
        torch.add(self.pos[k], 1, out=self.pos[1 - k])
        return logits, inputs, routing

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
        self.host_routing[k].copy_(self.out[k][2], non_blocking=True)
        self.host_token[k].copy_(self.ids[1 - k].view(-1), non_blocking=True)
        if self.cuda:
            self.events[k].record()

    def wait(self, k: int) -> tuple[list, int]:
        """Graph k's routing ([MoE layers][rows][k], on the host) and the token it picked, once it has run."""
        if self.cuda:
            self.events[k].synchronize()
        return self.host_routing[k].tolist(), int(self.host_token[k])


class LayerGraphs:
    """The careful one-token step as per-layer graphs, so that a miss costs its transfer.

    Each MoE layer is `pre` (attention, norms, router, routing written for the host), then `post_resident`
    (the experts from the slots the router saw, right when they were all resident), launched before the
    host has looked, so the GPU does not wait for it in a layer without a miss; after a miss the host loads
    the experts and runs `post` (the experts from the updated slots) again. A dense layer is one graph.

    pre(i, h, logits, record) -> (top_i, top_w, slots): the strategy's routing of layer i into record (a
    device tensor the host copies each layer); load(i, routing) -> whether it loaded anything: the
    strategy's loads for the routing the host read."""

    def __init__(self, step, pre, load, record: torch.Tensor, kv_version: int):
        self.step, self.pre, self.load, self.record, self.kv_version = step, pre, load, record, kv_version
        ref = step.model.embed
        self.x = torch.empty(ref.shape[1], dtype=ref.dtype, device=ref.device)  # the residual stream
        self.pos = torch.zeros(1, dtype=torch.long, device=ref.device)
        self.mask = step.kv.mask(self.pos).clone()  # the whole cache: shapes never change
        self.host_record = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
        self.routed = torch.cuda.Event()  # the layer's routing has reached host_record
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}  # layer index -> (pre, post_resident, post) or (dense,)

    def _capture_layer(self, i: int) -> None:
        """Capture layer i's graphs while running it for this step."""
        s, x, pos, mask = self.step, self.x, self.pos, self.mask
        if self.step.model.layers[i].moe is None:
            self.graphs[i] = (capture(lambda: x.copy_(s.layer(i, x, pos, mask)), self.pool)[0],)
            return

        def pre():
            h, resid, logits = s.attention(i, x, pos, mask)
            return (h, resid, *self.pre(i, h, logits, self.record))

        pre_graph, (h, resid, top_i, top_w, slots), _ = capture(pre, self.pool)
        pre_graph.replay()  # fills its outputs with this step's values (capturing computed nothing)
        self.load(i, self.record.tolist())
        post_resident = capture(lambda: x.copy_(s.experts(i, h, resid, top_i, top_w, slots)), self.pool)[0]
        # post's warm-up last: it writes this step's right output
        post = capture(lambda: x.copy_(s.experts(i, h, resid, top_i, top_w)), self.pool)[0]
        self.graphs[i] = (pre_graph, post_resident, post)

    def run(self, x: torch.Tensor, input_pos: torch.Tensor, start: int) -> torch.Tensor:
        """Layers start.. for one token whose layer-`start` input is x [H]; returns the final hidden [H]."""
        self.x.copy_(x)
        self.pos.copy_(input_pos)
        self.mask.copy_(self.step.kv.mask(input_pos))
        for i in range(start, len(self.step.model.layers)):
            if i not in self.graphs:
                self._capture_layer(i)
                continue
            entry = self.graphs[i]
            if len(entry) == 1:
                entry[0].replay()
                continue
            pre, post_resident, post = entry
            pre.replay()
            self.host_record.copy_(self.record, non_blocking=True)
            self.routed.record()
            self.step.cache.wait_prefetch()  # the experts loaded ahead for this layer have landed
            post_resident.replay()  # runs while the host looks at the routing
            self.routed.synchronize()  # the layer's one host sync
            if self.load(i, self.host_record.tolist()):  # post_resident read an absent expert's slot
                post.replay()
        return self.x.clone()
