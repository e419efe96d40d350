"""One decoded token (batch row 0) through every layer in a few operations per layer.

Each layer: the QKV product with the RMSNorm feeding it; one attention op (q/k norm, RoPE, the KV write,
attention over the cache); the output projection; the router's product with the next norm and the
residual add; routing (top-k and each expert's slot in the cache's slabs); the routed experts read in
place from their slots and added to the residual. The operations are the Triton kernels (kernels.py,
moe_kernels.py) or, where those cannot run, the same operations in PyTorch (torch_ops.py), chosen once.

The step never loads an expert: it reads the slots it is given, or the slot tables as they are. Which
experts are resident is the decode strategy's business (decode.py); with in-place misses, the cache's
LRU on the device gives an absent expert a slot inside `route` and the expert op reads it from the host
tier (residency.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import kernels, moe_kernels, torch_ops
from .model import Transformer

TRITON_OPS = SimpleNamespace(rms_norm=kernels.rms_norm, linear=kernels.linear, norm_linear=kernels.norm_linear,
                  attention=kernels.attention, route=moe_kernels.route, moe=moe_kernels.moe)
TORCH_OPS = SimpleNamespace(rms_norm=torch_ops.rms_norm, linear=torch_ops.linear, norm_linear=torch_ops.norm_linear,
                 attention=torch_ops.attention, route=torch_ops.route, moe=torch_ops.moe)


class FusedStep:
    """ops: TRITON_OPS or TORCH_OPS. in_place: misses read from the host tier inside the step (the kernels
    and the cache's device policy only)."""

    def __init__(self, model: Transformer, ops: SimpleNamespace, in_place: bool = False):
        self.model, self.cache, self.kv, self.cfg = model, model.cache, model.kv, model.cfg
        self.ops, self.in_place = ops, in_place
        self.moe_layers = [b.moe.layer for b in model.layers if b.moe is not None]

    def attention(self, i: int, x, pos, mask):
        """Layer i's attention half for x [H] -> (the MLP's normed input, the residual stream after
        attention, the router's logits, None in a dense layer). Each norm runs inside the product it feeds."""
        block, c, op = self.model.layers[i], self.cfg, self.ops
        qkv = op.norm_linear(x, block.ln1, c.rms_norm_eps, block.attn.wqkv)
        y = op.attention(qkv, block.attn.q_norm, block.attn.k_norm, self.kv.cos, self.kv.sin, pos, self.kv.k[i],
                         self.kv.v[i], mask, c.num_heads, c.num_kv_heads, c.rms_norm_eps, c.head_dim ** -0.5)
        delta = op.linear(y, block.attn.wo)
        if block.moe is not None:
            logits, h, resid = op.norm_linear(x, block.ln2, c.rms_norm_eps, block.moe.router, delta=delta)
            return h, resid, logits
        return (*op.rms_norm(x, block.ln2, c.rms_norm_eps, delta=delta), None)

    def route(self, i: int, logits, record=None, in_place: bool = False):
        """Layer i's routing -> (top_i [k], top_w [k], slots [k], src), written as float32 into record
        [2, k] ([3, k] with each expert's outcome when in place) for the host. An absent expert's slot
        reads as 0, unless in place, where the device's LRU gives it one and src says where it is in
        the host tier."""
        layer = self.model.layers[i].moe.layer
        _, _, table = self.cache.slabs(layer)
        policy = self.cache.device_lru.args(layer) if in_place else None
        return self.ops.route(logits, table, self.cfg.experts_per_token, self.cfg.norm_topk_prob, record, policy)

    def experts(self, i: int, h, resid, top_i, top_w, slots=None, src=None):
        """resid + layer i's routed experts applied to h, each read in place from its slot (looked up in the
        slot table now when slots is None: after the experts were loaded), or from the host tier where src
        says so (written into its slot on the way)."""
        block = self.model.layers[i]
        if block.moe is None:
            return resid + block.mlp(h)
        w1, w2, table = self.cache.slabs(block.moe.layer)
        host = (self.cache.device_lru.host[block.moe.layer], src) if src is not None else None
        quant = self.cache.quant_slabs(block.moe.layer)
        return self.ops.moe(h, w1, w2, table[top_i] if slots is None else slots, top_w, resid, host,
                            **({} if quant is None else {"quant": quant}))

    def layer(self, i: int, x, pos, mask, record=None):
        """Layer i for x [H], assuming its routed experts are resident (or read in place)."""
        h, resid, logits = self.attention(i, x, pos, mask)
        if logits is None:
            return self.experts(i, h, resid, None, None)
        top_i, top_w, slots, src = self.route(i, logits, record, self.in_place)
        return self.experts(i, h, resid, top_i, top_w, slots, src)

    def head(self, x):
        return self.ops.norm_linear(x, self.model.norm, self.cfg.rms_norm_eps, self.model.lm_head)

    def routing_rows(self) -> int:
        """Rows of a layer's routing record: experts, weights (and outcomes, when in place)."""
        return 3 if self.in_place else 2

    def optimistic(self, input_ids, pos):
        """The whole token assuming every routed expert is resident (or read in place): no host sync, and
        only device tensors read, so that it can be a CUDA graph. Returns (logits [1, 1, V], each layer's
        input [H], the routing of every MoE layer [layers, rows, k] for the host to read in one copy)."""
        x = F.embedding(input_ids, self.model.embed).view(-1)
        mask = self.kv.mask(pos)  # the whole cache, later positions masked: shapes never change
        routing = torch.empty(len(self.moe_layers), self.routing_rows(), self.cfg.experts_per_token,
                              dtype=torch.float32, device=x.device)
        inputs, j = [], 0
        for i, block in enumerate(self.model.layers):
            inputs.append(x)
            record = None
            if block.moe is not None:
                record, j = routing[j], j + 1
            x = self.layer(i, x, pos, mask, record)
        if self.in_place:
            self.cache.device_lru.tick()
        return self.head(x).view(1, 1, -1), inputs, routing
