"""The careful one-token decode step on CUDA as per-layer graphs, so that a miss costs its transfer.

The optimistic step (the whole token as one graph) is right when every routed expert is resident. When
some are not, each MoE layer must show its routing to the host before its experts run, so the host can
load the missing ones. Launched eagerly, that is dozens of small kernels and Triton launches per layer;
here each MoE layer is graphs: `pre` (attention, norms, router, routing written for the host), then
`post_resident` (the experts from the slots the router saw, right when they were all resident),
launched before the host has looked, so the GPU does not wait for it in a layer without a miss; after a
miss the host loads the experts and runs `post` (the experts from the updated slots) again. A dense
layer is one graph. Graphs are captured the first time a layer runs, on real data, so their warm-up
writes only what the step itself writes; they are dropped when the KV cache is reallocated.
"""

from __future__ import annotations

import torch


def capture(fn, pool=None):
    """Run fn once eagerly on a side stream (compiles kernels, writes what the step writes), then
    capture it into a graph sharing `pool` (None: a pool of its own). Returns (graph, fn's outputs,
    which the graph rewrites, and the eager run's outputs)."""
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


class LayerGraphs:
    def __init__(self, model):
        self.model = model
        self.kv_version = model._kv_version
        ref = model.embed
        self.x = torch.empty(ref.shape[1], dtype=ref.dtype, device=ref.device)  # the residual stream
        self.pos = torch.zeros(1, dtype=torch.long, device=ref.device)
        self.mask = model.causal[0:1].clone()  # the whole cache: shapes never change
        self.record = model.routing_record(ref.device)
        self.host_record = torch.empty(self.record.shape, dtype=self.record.dtype, pin_memory=True)
        self.routed = torch.cuda.Event()  # the layer's routing has reached host_record
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}  # layer index -> (pre, post_resident, post) or (dense,)

    def _capture_layer(self, i: int, block) -> None:
        """Capture layer i's graphs while running it for this step (each capture's eager warm-up is the
        real computation: it writes this step's KV entries and residual stream)."""
        m, x, pos, mask = self.model, self.x, self.pos, self.mask
        if not hasattr(block.mlp, "route_fused"):  # a dense layer: one graph
            def dense():
                x.copy_(block.forward_fused(x, m.rope_cos, m.rope_sin, pos, mask))
            self.graphs[i] = (capture(dense, self.pool)[0],)
            return

        def pre():
            h, resid, logits = block.attention_fused(x, m.rope_cos, m.rope_sin, pos, mask)
            return (h, resid, *m.route_careful(block, h, logits, self.record))

        pre_graph, (h, resid, top_i, top_w, slots), _ = capture(pre, self.pool)
        pre_graph.replay()  # fills its outputs with this step's values (capturing computed nothing)
        m.load_routed(block.mlp.layer, self.record.tolist())
        m.cache.wait_prefetch()

        def post_resident():
            x.copy_(block.mlp.experts_fused(h, resid, top_i, top_w, slots))

        def post():
            x.copy_(block.mlp.experts_fused(h, resid, top_i, top_w))
        # post's warm-up last: it writes this step's right output
        self.graphs[i] = (pre_graph, capture(post_resident, self.pool)[0], capture(post, self.pool)[0])

    def run(self, x: torch.Tensor, input_pos: torch.Tensor, start: int) -> torch.Tensor:
        """Layers start.. for one token whose layer-`start` input is x [H]; returns the final hidden [H]."""
        m = self.model
        self.x.copy_(x)
        self.pos.copy_(input_pos)
        self.mask.copy_(m.causal[input_pos])
        for i, block in enumerate(m.layers[start:], start):
            if i not in self.graphs:
                self._capture_layer(i, block)
                continue
            entry = self.graphs[i]
            if len(entry) == 1:
                entry[0].replay()
                continue
            pre, post_resident, post = entry
            pre.replay()
            self.host_record.copy_(self.record, non_blocking=True)
            self.routed.record()
            m.cache.wait_prefetch()  # the experts loaded ahead for this layer have landed
            post_resident.replay()  # runs while the host looks at the routing
            self.routed.synchronize()  # the layer's one host sync
            misses = m.cache.misses
            m.load_routed(block.mlp.layer, self.host_record.tolist())
            if m.cache.misses != misses:  # post_resident read an absent expert's slot: again, after the loads
                m.cache.wait_prefetch()
                post.replay()
        return self.x.clone()
