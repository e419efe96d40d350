"""The Qwen3-MoE text decoder (also the Qwen3-Omni thinker's), built from the dense file and an ExpertCache.

Plain PyTorch in the gpt-fast manner: one preallocated KV cache, `forward(input_ids, input_pos)`, and
every numeric step written the way transformers writes it so logits match to float32 rounding.
For text-only input the thinker's three MRoPE position streams are equal, which makes its interleaved
MRoPE the standard rotate-half RoPE used here (the parity tests check this).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..checkpoint.layouts import Layout, TextConfig
from ..errors import InputError
from . import kernels, moe_kernels
from .cache_policy import step_accesses
from .expert_cache import ExpertCache
from .layer_graphs import LayerGraphs


TRACE_COLUMNS = ("prompt", "step", "position", "layer", "experts", "weights")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers: variance in float32, normalise, cast back, then multiply by the weight
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, w: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        # q, k and v as one weight: one matrix-vector product per token instead of three
        self.wqkv = torch.cat([w[f"self_attn.{p}_proj.weight"] for p in "qkv"])
        self.wo = w["self_attn.o_proj.weight"]
        self.q_norm, self.k_norm = w["self_attn.q_norm.weight"], w["self_attn.k_norm.weight"]
        self.k_cache = self.v_cache = None

    def forward(self, x, cos, sin, input_pos, mask):
        c = self.cfg
        b, t, _ = x.shape
        q, k, v = F.linear(x, self.wqkv).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        q = rms_norm(q.reshape(b, t, c.num_heads, c.head_dim), self.q_norm, c.rms_norm_eps)
        k = rms_norm(k.reshape(b, t, c.num_kv_heads, c.head_dim), self.k_norm, c.rms_norm_eps)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        end = mask.shape[-1]  # only the cache prefix any query can see
        y = F.scaled_dot_product_attention(q, self.k_cache[:b, :, :end], self.v_cache[:b, :, :end], attn_mask=mask,
                                           scale=c.head_dim ** -0.5, enable_gqa=c.num_heads != c.num_kv_heads)
        return F.linear(y.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim), self.wo)

    def forward_fused(self, qkv, rope_cos, rope_sin, input_pos, mask):
        """One token of batch row 0 from its fused QKV product qkv: one kernel for q/k norm, RoPE, the
        cache write and attention, then the output projection. Returns [H]."""
        c = self.cfg
        y = kernels.attention(qkv, self.q_norm, self.k_norm, rope_cos, rope_sin, input_pos, self.k_cache,
                              self.v_cache, mask.reshape(-1), c.num_heads, c.num_kv_heads, c.rms_norm_eps,
                              c.head_dim ** -0.5)
        return kernels.linear(y, self.wo)


def swiglu(x, gate, up, down):
    """Qwen3's MLP, the same for an expert and for a dense layer: down(silu(gate x) * up x)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class DenseMLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor]):
        super().__init__()
        self.gate, self.up, self.down = (w[f"mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))

    def forward(self, x):
        return swiglu(x, self.gate, self.up, self.down)


class MoE(nn.Module):
    """Router exactly as transformers' TopKRouter; experts fetched from the cache one at a time, in
    `step_accesses` order, each applied as soon as it is fetched (a prefill may route to more unique
    experts than the cache holds)."""

    def __init__(self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], cache: ExpertCache, record):
        super().__init__()
        self.cfg, self.layer, self.router, self.cache, self.record = cfg, layer, w["mlp.gate.weight"], cache, record
        self.defer = False  # set by Transformer for an optimistic one-token step (see Transformer.optimistic_step)
        self.pending = None
        self.kernels = False  # set by Transformer: one-token steps through the fused kernels
        self.lookahead = None  # set by Transformer when the cache prefetches: (next MoE layer, its router)

    def route(self, flat):
        logits = F.linear(flat, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.cfg.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(logits.dtype), top_i

    def forward(self, x):
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        top_w, top_i = self.route(flat)
        if self.defer:  # assume the routed experts are resident; the Transformer checks after the step
            self.pending = (top_i, top_w)
            return self._apply_slots(flat, top_i, top_w).view(b, t, h)
        # The one device-to-host sync of the layer: the host must know the experts to load them.
        host = torch.stack((top_i.to(torch.float32), top_w.to(torch.float32))).cpu()
        chosen = host[0].to(torch.long).tolist()
        self.record(self.layer, chosen, host[1].tolist(), b, t)
        if len(chosen) == 1 and self.cache.keeps_step_resident:
            self.cache.get_many(self.layer, step_accesses(chosen))  # misses read in parallel
            if self.lookahead is not None:
                self.cache.prefetch(self.lookahead[0], self.predict_next(flat[0]).tolist())
            self.cache.wait_prefetch()  # this layer's experts may have been loaded ahead
            return self._apply_slots(flat, top_i, top_w).view(b, t, h)
        out = torch.zeros_like(flat)
        for e in step_accesses(chosen):
            gate, up, down = self.cache.get(self.layer, e)
            if gate.device != flat.device:  # unified memory: a prefill copies what it uses, decoding reads in place
                gate, up, down = (w.to(flat.device, non_blocking=True) for w in (gate, up, down))
            if len(chosen) == 1:  # decoding one token: no index tensors, no sync
                slot = chosen[0].index(e)
                out += swiglu(flat, gate, up, down) * top_w[:, slot, None]
                continue
            # indices built on the host from `chosen` (torch.where would sync once per expert)
            rows = [(tok, experts.index(e)) for tok, experts in enumerate(chosen) if e in experts]
            tok, slot = torch.tensor(rows, device=flat.device).unbind(1)
            out.index_add_(0, tok, swiglu(flat[tok], gate, up, down) * top_w[tok, slot, None])
        return out.view(b, t, h)

    def _apply_slots(self, flat, top_i, top_w):
        """One token through its k resident experts: gather their slots (device table, no host round
        trip) and apply them in two batched matmuls, a handful of kernels instead of a dozen per expert."""
        w1, w2, table = self.cache.slabs(self.layer)
        slots = table[top_i[0]]
        if self.kernels:  # the experts read in place from their slots
            return moe_kernels.moe(flat[0], w1, w2, slots, top_w[0])[None]
        gate, up = torch.matmul(w1[slots], flat[0]).chunk(2, dim=-1)  # [k, I] each
        y = torch.matmul(w2[slots], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [k, H]
        return (y * top_w[0, :, None]).sum(0, keepdim=True)

    def predict_next(self, h: torch.Tensor) -> torch.Tensor:
        """Router lookahead: the next MoE layer's top-k for this layer's normed input h [H], standing in
        for its own (the residual stream changes little from one layer to the next)."""
        return torch.topk(F.linear(h, self.lookahead[1]), self.cfg.experts_per_token).indices

    def route_fused(self, logits, record=None, in_place=False):
        """One token's router logits [E] -> (top_i [k], top_w [k], slots [k], src) through the route
        kernel. An absent expert's slot reads as 0 (see moe_kernels.route); with in_place, the cache's policy
        on the device gives it a slot at once and src says where it is in the host tier."""
        _, _, table = self.cache.slabs(self.layer)
        policy = self.cache.device_policy.args(self.layer) if in_place else None
        return moe_kernels.route(logits, table, self.cfg.experts_per_token, self.cfg.norm_topk_prob, record, policy)

    def experts_fused(self, h, resid, top_i, top_w, slots=None, src=None):
        """resid + the routed experts applied to h, each read in place from its slot (looked up now in the
        slot table when slots is None: after the experts were loaded), or from the host tier where src
        says so (written into its slot on the way)."""
        w1, w2, table = self.cache.slabs(self.layer)
        host = (self.cache.device_policy.host[self.layer], src) if src is not None else None
        return moe_kernels.moe(h, w1, w2, table[top_i] if slots is None else slots, top_w, resid, host)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], cache: ExpertCache, record):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.attn = Attention(cfg, w)
        self.mlp = MoE(cfg, layer, w, cache, record) if cfg.has_experts(layer) else DenseMLP(w)
        self.ln1, self.ln2 = w["input_layernorm.weight"], w["post_attention_layernorm.weight"]

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.attn(rms_norm(x, self.ln1, self.eps), cos, sin, input_pos, mask)
        return x + self.mlp(rms_norm(x, self.ln2, self.eps))

    def attention_fused(self, x, rope_cos, rope_sin, input_pos, mask):
        """One token of batch row 0 through the fused kernels, x [H] -> (the MLP's normed input, the
        residual stream after attention, the router's logits or None in a dense layer). Each norm runs
        inside the product it feeds (norm_linear)."""
        qkv = kernels.norm_linear(x, self.ln1, self.eps, self.attn.wqkv)
        delta = self.attn.forward_fused(qkv, rope_cos, rope_sin, input_pos, mask)
        if isinstance(self.mlp, MoE):
            logits, h, resid = kernels.norm_linear(x, self.ln2, self.eps, self.mlp.router, delta=delta)
            return h, resid, logits
        return (*kernels.rms_norm(x, self.ln2, self.eps, delta=delta), None)

    def forward_fused(self, x, rope_cos, rope_sin, input_pos, mask, record=None, in_place=False):
        """The whole layer for one token, x [H] -> [H], assuming the routed experts are resident (or, with
        in_place, reading the absent ones from the host tier); the routing goes into record [2, k]
        (float32; [3, k] with the outcomes when in_place) for the caller to check."""
        h, resid, logits = self.attention_fused(x, rope_cos, rope_sin, input_pos, mask)
        if isinstance(self.mlp, MoE):
            top_i, top_w, slots, src = self.mlp.route_fused(logits, record, in_place)
            return self.mlp.experts_fused(h, resid, top_i, top_w, slots, src)
        return resid + self.mlp(h)


class Transformer(nn.Module):
    """`forward(input_ids [B,T], input_pos [T]) -> logits [B,T,V]` through the first `depth` layers."""

    def __init__(self, cfg: TextConfig, layout: Layout, dense: dict[str, torch.Tensor], cache: ExpertCache,
                 depth: int | None = None, use_kernels: bool | None = None):
        """use_kernels: one-token steps through the fused Triton kernels (None: on CUDA when Triton is there)."""
        super().__init__()
        depth = cfg.num_layers if depth is None else depth
        if not 1 <= depth <= cfg.num_layers:
            raise InputError(f"depth {depth} is out of range: the model has {cfg.num_layers} layers")
        self.cfg, self.layout, self.depth, self.cache = cfg, layout, depth, cache
        self.embed = dense[f"{layout.prefix}embed_tokens.weight"]
        self.norm = dense[f"{layout.prefix}norm.weight"]
        self.lm_head = dense.get(layout.lm_head)
        if self.lm_head is None:
            if not cfg.tie_word_embeddings:
                raise InputError(f"dense file lacks {layout.lm_head}")
            self.lm_head = self.embed
        self.layers = nn.ModuleList(
            Block(cfg, L, {k[len(layout.layer(L)):]: v for k, v in dense.items() if k.startswith(layout.layer(L))},
                  cache, self.record)
            for L in range(depth))
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** half)
        self.max_seq_len = 0
        self.trace: list[tuple] = []  # rows of TRACE_COLUMNS
        self.trace_context: dict = {"prompt": 0, "step": 0}
        self.record_trace = True
        self._pos = None
        self.step_graphs = None  # the optimistic step captured on CUDA (decode.StepGraphs), kept across calls
        self._layer_graphs = None  # the careful decode step on CUDA, as per-layer graphs
        self._deferred = None  # a settled step's hits, not yet accounted (see flush)
        self.kernels = kernels.available(self.embed.device) if use_kernels is None else use_kernels
        if self.kernels and not kernels.available(self.embed.device):
            raise InputError(f"the fused kernels need Triton and a CUDA device (or TRITON_INTERPRET=1), "
                             f"not {self.embed.device}")
        if self.kernels and self.embed.device.type != "cuda" and use_kernels is None:
            self.kernels = False  # under the interpreter only when asked for (tests): it is slow
        # one-token steps read misses from the host tier in place, the cache's policy on the device
        self.in_place = self.kernels and cache.device_policy is not None
        moes = [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]
        for i, moe in enumerate(moes):
            moe.kernels = self.kernels
            if cache.prefetches and i + 1 < len(moes):
                moe.lookahead = (moes[i + 1].layer, moes[i + 1].router)
        self._kv_version = 0  # bumped whenever setup_caches allocates: a captured graph reads the old buffers

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        c, ref = self.cfg, self.embed
        have_batch = 0 if self.layers[0].attn.k_cache is None else self.layers[0].attn.k_cache.shape[0]
        if self.max_seq_len >= max_seq_len and have_batch >= max_batch:
            return  # positions past the current one are masked, so stale cache entries are harmless
        max_batch, max_seq_len = max(max_batch, have_batch), max(max_seq_len, self.max_seq_len)
        for block in self.layers:
            shape = (max_batch, c.num_kv_heads, max_seq_len, c.head_dim)
            block.attn.k_cache = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            block.attn.v_cache = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1).to(ref.device)
        self.rope_cos, self.rope_sin = emb.cos().to(ref.dtype), emb.sin().to(ref.dtype)  # cast like transformers
        self.causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=ref.device).tril()
        self.max_seq_len = max_seq_len
        self._kv_version += 1

    def record(self, layer: int, chosen: list[list[int]], w: list[list[float]], b: int, t: int) -> None:
        """Trace rows as tuples (TRACE_COLUMNS): cheap enough for the decode step's host work."""
        if not self.record_trace:
            return
        prompt, step = self.trace_context["prompt"], self.trace_context["step"]
        per_row = isinstance(prompt, (list, tuple))
        for i, (experts, ws) in enumerate(zip(chosen, w)):
            row_b, row_t = divmod(i, t)
            self.trace.append((prompt[row_b] if per_row else prompt, step, self._pos[row_t], layer, experts, ws))

    def check_positions(self, positions: list[int]) -> int:
        """The KV length a step at these positions sees; one line if they run past the cache."""
        end = positions[-1] + 1
        if end > self.max_seq_len:
            raise InputError(f"position {end - 1} is past the KV cache ({self.max_seq_len}): call setup_caches")
        return end

    def begin_step(self, positions: list[int]) -> None:
        """Before a step's host work: the previous step's deferred bookkeeping, then this step's positions
        (for its trace rows)."""
        self.flush()
        self._pos = positions

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, positions: list[int] | None = None):
        """Every layer, each MoE layer showing its routing to the host and loading its experts before they
        run: the prefill, and the careful one-token step. positions: input_pos as host ints, when the
        caller has them (saves a device round trip)."""
        positions = input_pos.tolist() if positions is None else positions
        end = self.check_positions(positions)
        self.begin_step(positions)
        return self.head(self.careful_from(F.embedding(input_ids, self.embed), input_pos, 0, end))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head)

    def careful_from(self, x: torch.Tensor, input_pos: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Layers start.. for x [B, T, H] (its layer-`start` input), loading each MoE layer's experts
        before they run; end: the KV length the step sees. Returns the final hidden [B, T, H]."""
        one_token = x.shape[0] * x.shape[1] == 1 and self.cache.keeps_step_resident
        if one_token and self.kernels:  # through the kernels: on CUDA as per-layer graphs
            if self.embed.is_cuda:
                if self._layer_graphs is None or self._layer_graphs.kv_version != self._kv_version:
                    self._layer_graphs = LayerGraphs(self)
                x = self._layer_graphs.run(x.view(-1), input_pos, start)
            else:
                x = self._careful_fused(x.view(-1), input_pos, self.causal[input_pos, :end], start)
            x = x.view(1, 1, -1)
        else:
            mask = self.causal[input_pos, :end]
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            for block in self.layers[start:]:
                x = block(x, cos, sin, input_pos, mask)
        self.cache.wait_prefetch()  # whatever runs next may read the experts loaded ahead
        return x

    def optimistic_step(self, input_ids: torch.Tensor, input_pos: torch.Tensor):
        """One token through every layer assuming each routed expert is already resident: no host sync
        at all. Returns (logits [1, 1, V], each layer's input, (MoE layers, their routing [layers, 2, k]
        on the device)) for `settle`. The mask covers the whole KV cache (later positions masked out) and
        only device tensors are read, so shapes never change and the step can be a CUDA graph."""
        x, mask = F.embedding(input_ids, self.embed), self.causal[input_pos]
        if self.kernels and x.shape[0] == 1:
            return self._optimistic_fused(x.view(-1), mask, input_pos)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        moes, inputs = [b.mlp for b in self.layers if isinstance(b.mlp, MoE)], []
        try:
            for m in moes:
                m.defer = True
            for block in self.layers:
                inputs.append(x)
                x = block(x, cos, sin, input_pos, mask)
        finally:
            for m in moes:
                m.defer = False
        logits = F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head)
        # every MoE layer's choice in one [layers, 2, k] float32 tensor: the host reads it in one copy
        routing = torch.stack([torch.stack((m.pending[0][0].to(torch.float32), m.pending[1][0].to(torch.float32)))
                               for m in moes]) if moes else None
        return logits, inputs, ([m.layer for m in moes], routing)

    def _optimistic_fused(self, x, mask, input_pos):
        """`optimistic_step` for one row through the fused kernels: about ten launches a layer."""
        moe_layers = [b.mlp.layer for b in self.layers if isinstance(b.mlp, MoE)]
        # the route kernels write each layer's choice here (and each expert's outcome, in place), so the
        # host reads the step's in one copy
        rows = 3 if self.in_place else 2
        routing = torch.empty(len(moe_layers), rows, self.cfg.experts_per_token, dtype=torch.float32, device=x.device)
        inputs, j = [], 0
        for block in self.layers:
            inputs.append(x.view(1, 1, -1))
            if isinstance(block.mlp, MoE):
                x = block.forward_fused(x, self.rope_cos, self.rope_sin, input_pos, mask, routing[j], self.in_place)
                j += 1
            else:
                x = block.forward_fused(x, self.rope_cos, self.rope_sin, input_pos, mask)
        if self.in_place:
            self.cache.device_policy.tick()
        logits = kernels.norm_linear(x, self.norm, self.cfg.rms_norm_eps, self.lm_head)
        return logits.view(1, 1, -1), inputs, (moe_layers, routing if moe_layers else None)

    def load_routed(self, layer: int, routing: list[list[float]]) -> None:
        """A careful step's layer: its routing [experts, weights(, the next MoE layer's predicted
        experts)] on the host, recorded, and its experts made resident (misses read in parallel) before
        the experts run; the predicted ones are loaded ahead."""
        chosen = [int(e) for e in routing[0]]
        self.record(layer, [chosen], [routing[1]], 1, 1)
        self.cache.get_many(layer, step_accesses([chosen]))
        lookahead = self.layers[layer].mlp.lookahead
        if lookahead is not None:
            self.cache.prefetch(lookahead[0], [int(e) for e in routing[2]])

    def routing_record(self, device) -> torch.Tensor:
        """Where a careful step's layer writes what the host reads in its one sync: [2, k] experts and
        weights, and a third row, the next layer's predicted experts, when the cache prefetches."""
        rows = 3 if self.cache.prefetches else 2
        return torch.empty(rows, self.cfg.experts_per_token, dtype=torch.float32, device=device)

    def route_careful(self, block: Block, h: torch.Tensor, logits: torch.Tensor, record: torch.Tensor):
        """A careful step's routing through the kernels into `record` (see routing_record): top_i, top_w
        and the slots as the table has them now (an absent expert's reads as 0)."""
        top_i, top_w, slots, _ = block.mlp.route_fused(logits, record[:2])
        if record.shape[0] == 3 and block.mlp.lookahead is not None:
            record[2].copy_(block.mlp.predict_next(h))
        return top_i, top_w, slots

    def _careful_fused(self, x, input_pos, mask, start: int):
        """Layers start.. for one token through the kernels, each MoE layer's routing brought to the host
        (its one sync) and its experts loaded before they run: a miss costs its transfer. On CUDA the same
        steps run as per-layer graphs (LayerGraphs)."""
        record = self.routing_record(x.device)
        for block in self.layers[start:]:
            h, resid, logits = block.attention_fused(x, self.rope_cos, self.rope_sin, input_pos, mask)
            if isinstance(block.mlp, MoE):
                top_i, top_w, _ = self.route_careful(block, h, logits, record)
                self.load_routed(block.mlp.layer, record.tolist())
                x = block.mlp.experts_fused(h, resid, top_i, top_w)
            else:
                x = resid + block.mlp(h)
        return x

    def settle(self, layers: list[int], host: list) -> int:
        """An optimistic step's routing, read by the host ([layers][2][k]): the cache replays the step's
        accesses in order. Returns len(self.layers) when every routed expert was resident, else the
        first layer that routed to an absent one: the caller redoes the step from there the careful way
        (its KV entries at this position are simply overwritten)."""
        if not layers:
            return len(self.layers)
        if self.in_place:  # every expert ran, from its slot or from the host tier: nothing to redo
            self._deferred = (layers, host, self._pos, dict(self.trace_context))
            return len(self.layers)
        for j, (layer, (experts, _)) in enumerate(zip(layers, host)):
            if not all(self.cache.is_resident(layer, int(e)) for e in experts):
                self._deferred = (layers[:j], host[:j], self._pos, dict(self.trace_context))
                self.flush()  # the hits before it, now: the careful redo goes on from here
                return layer
        # All hits: counting them (cache policy, counters, trace) waits for the next step's launch.
        self._deferred = (layers, host, self._pos, dict(self.trace_context))
        return len(self.layers)

    def flush(self) -> None:
        """Account a settled step's hits in order: recency in the cache policy, counters, trace rows.
        Deferred from `settle` so that the host does it while the GPU runs the next step; callers that
        read the cache's counters call it first (generate does)."""
        if self._deferred is None:
            return
        (layers, host, pos, context), self._deferred = self._deferred, None
        saved, (self._pos, self.trace_context) = (self._pos, self.trace_context), (pos, context)
        for layer, (experts, weights, *outcomes) in zip(layers, host):
            chosen = [int(e) for e in experts]
            if outcomes:  # in place: the device's policy served them; count what it did
                self.cache.count_step(layer, chosen, outcomes[0])
            else:  # all hits: counted, recency refreshed in order
                self.cache.get_many(layer, step_accesses([chosen]))
            self.record(layer, [chosen], [weights], 1, 1)
        self._pos, self.trace_context = saved


def load_dense(path: str | Path, layout: Layout, depth: int, device, dtype) -> dict[str, torch.Tensor]:
    """The dense file's tensors that the first `depth` layers (plus embed, norm, lm_head) need."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dense file {path} does not exist")
    layers = f"{layout.prefix}layers."

    def keep(name: str) -> bool:
        return not name.startswith(layers) or int(name[len(layers):].split(".")[0]) < depth

    with safe_open(path, framework="pt") as f:  # read only the tensors kept, not the whole file
        return {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys() if keep(k)}
