"""The Qwen3-MoE text decoder (also the Qwen3-Omni thinker's): the reference model, built from the dense
file and an ExpertCache.

Plain PyTorch in the gpt-fast manner: `forward(input_ids, input_pos)` over a preallocated KV cache, every
numeric step written the way transformers writes it so logits match to float32 rounding. It runs the
prompt (prefill), batches, teacher forcing and every step on a cache policy other than LRU; one-token
decode steps have their own path (fused_step.py), checked against this one. RoPE reads the KV cache's
per-slot tables: for text the thinker's three MRoPE streams are equal, which makes its interleaved MRoPE
the standard rotate-half RoPE; a multimodal prompt writes its own positions there (KVCache.set_rope), so
every path reads them alike (the parity tests check both). On CUDA the elementwise steps around the GEMMs
(norms, q/k norm and RoPE, SwiGLU's product, the experts' weighted sums) take prefill_kernels.py's Triton
kernels, chosen once at construction; the functions here of the same names are their reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ..checkpoint.layouts import Layout, TextConfig
from ..checkpoint.quantize import dequantize
from ..errors import InputError
from . import kernels, moe_kernels, prefill_kernels
from .expert_cache import ExpertCache
from .kv_cache import KVCache
from .trace import RouterTrace


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers: variance in float32, normalise, cast back, then multiply by the weight
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def swiglu(x, gate, up, down):
    """Qwen3's MLP, the same for an expert and for a dense layer: down(silu(gate x) * up x)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [P, 2I] (gate then up, one grouped product) -> silu(gate) * up [P, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def norm_rotate(qk, q_norm, k_norm, n_heads: int, cos, sin, eps: float):
    """qk [..., heads, D], n_heads of q's then k's -> each head RMS-normed by its own weight (q_norm or
    k_norm) and rotated (cos, sin broadcast over the heads). q's and k's heads as one tensor: the same
    arithmetic per head in half the ops (a short prompt's time on the CPU, or a decode step's, is its ops)."""
    d = q_norm.numel()
    qk = rms_norm(qk, torch.cat([q_norm.expand(n_heads, d), k_norm.expand(qk.shape[-2] - n_heads, d)]), eps)
    return qk * cos + rotate_half(qk) * sin


def qkv_heads(qkv, q_norm, k_norm, cos, sin, start: int, n_heads: int, n_kv: int, eps: float):
    """qkv [B, T, (n_heads + 2 n_kv) * D] at positions start .. start + T - 1 -> q [B, n_heads, T, D], k and
    v [B, n_kv, T, D]: q and k RMS-normed per head and rotated (cos, sin [S, D]: the KV cache's tables)."""
    b, t, _ = qkv.shape
    d = q_norm.numel()
    qk, v = qkv.split([(n_heads + n_kv) * d, n_kv * d], dim=-1)
    # rotated in the product's [B, T, heads, D] order (contiguous: faster elementwise on the CPU), then
    # viewed as heads first
    qk = norm_rotate(qk.reshape(b, t, n_heads + n_kv, d), q_norm, k_norm, n_heads, cos[start:start + t, None],
                     sin[start:start + t, None], eps)
    q, k = qk.split([n_heads, n_kv], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.reshape(b, t, n_kv, d).transpose(1, 2)


def combine(y: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [P, H] expert products in any order, rows [N * k]: the row of y holding token n's choice j,
    weights [N, k] -> [N, H]: each product weighted and rounded (as transformers' experts round theirs),
    then each token's k added up."""
    n, k = weights.shape
    return (y[rows] * weights.reshape(-1, 1)).view(n, k, -1).sum(1)


_RANGES: dict[torch.device, torch.Tensor] = {}


def positions(n: int, device: torch.device) -> torch.Tensor:
    """0 .. n-1 (int64) on `device`, a slice of one range kept per device: each MoE layer of a prompt asks for
    two, and a fresh arange is a launch on CUDA (a short prompt's time is its launches)."""
    r = _RANGES.get(device)
    if r is None or r.numel() < n:
        r = _RANGES[device] = torch.arange(max(n, 4096), device=device)
    return r[:n]


def expert_counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids [..., M] of experts 0..n-1 -> [..., n]: how often each appears, on the ids' device without a host
    round trip (torch.bincount on CUDA reads the ids' min and max on the host first: two syncs a call)."""
    counts = torch.zeros(*ids.shape[:-1], n, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(-1, ids, torch.ones_like(ids))


def merge_by_lse(a: torch.Tensor, lse_a: torch.Tensor, b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two attentions of the same queries [B, H, T, D] over disjoint keys, with their log-sum-exps [B, H, T]
    (float32): the attention over both, each weighted by its share of the softmax's mass."""
    lse_a, lse_b = lse_a.reshape(*a.shape[:3], 1), lse_b.reshape(*a.shape[:3], 1)
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - top).exp(), (lse_b - top).exp()
    return ((a.float() * w_a + b.float() * w_b) / (w_a + w_b)).to(a.dtype)


def attend_after_prefix(q, keys, values, prefix: int, scale: float, merge=merge_by_lse) -> torch.Tensor:
    """Queries that are the last T of the keys' positions: every one of the first `prefix` keys, causal over
    the rest. Two flash calls merged by their log-sum-exp: PyTorch would otherwise attend through a
    lower-right causal mask, which the CPU materialises (3x slower for a second 4096-token chunk) and CUDA
    runs on FlashAttention-2 (0.69x the time on cuDNN's Hopper kernel here, for 8k queries after 24k keys
    on an H100). CPU: any dtype, the KV heads repeated for GQA; CUDA: 16-bit, cuDNN reading each KV head
    for its query heads in place."""
    if q.device.type == "cpu":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

        def attend(k, v, causal):
            return flash(q, k, v, 0.0, causal, scale=scale)[:2]
    else:
        cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention

        def attend(k, v, causal):  # (out, log-sum-exp, ...): compute_log_sumexp on, no dropout or debug mask
            return cudnn(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    before, lse_before = attend(keys[:, :, :prefix], values[:, :, :prefix], False)
    within, lse_within = attend(keys[:, :, prefix:], values[:, :, prefix:], True)
    return merge(before, lse_before, within, lse_within)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], fused: bool = False):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv_heads = prefill_kernels.qkv_heads if fused else qkv_heads
        self.merge_by_lse = prefill_kernels.merge_by_lse if fused else merge_by_lse
        # q, k and v as one weight: one product per token instead of three
        self.wqkv = torch.cat([w[f"self_attn.{p}_proj.weight"] for p in "qkv"])
        self.wo = w["self_attn.o_proj.weight"]
        self.q_norm, self.k_norm = w["self_attn.q_norm.weight"], w["self_attn.k_norm.weight"]

    def forward(self, x, kv: KVCache, end):
        """x [B, T, H] at positions end - T .. end - 1 (contiguous, as forward's callers pass them)."""
        c = self.cfg
        b, t, _ = x.shape
        q, k, v = self.qkv_heads(F.linear(x, self.wqkv), self.q_norm, self.k_norm, kv.cos, kv.sin, end - t,
                                 c.num_heads, c.num_kv_heads, c.rms_norm_eps)  # [B, heads, T, D]
        keys, values = kv.update(self.layer, k, v, end)  # only the prefix any query can see
        gqa = c.num_heads != c.num_kv_heads
        # A chunk after the first attends in two calls merged by log-sum-exp (CPU; CUDA in 16 bits with a
        # head_dim cuDNN takes, a multiple of 8); a first chunk, or the rest on CUDA, through SDPA
        merged = end != t and (q.device.type == "cpu" or (q.dtype in (torch.bfloat16, torch.float16)
                                                         and c.head_dim % 8 == 0))
        if gqa and (q.device.type == "cpu" or (end != t and not merged)):
            # KV heads repeated for GQA (transformers' repeat_kv): the CPU's SDPA and flash op have no GQA of
            # their own, nor has CUDA's lower-right causal bias one it computes in float32 precision (with
            # enable_gqa, a 2100-token prompt's decode logits were 6.8e-4 off transformers' on an H100,
            # 6e-6 with the heads repeated); a first chunk's SDPA and cuDNN read each KV head in place
            keys = keys.repeat_interleave(c.num_heads // c.num_kv_heads, dim=1)
            values = values.repeat_interleave(c.num_heads // c.num_kv_heads, dim=1)
            gqa = False
        # The positions are the last T of 0..end-1 (contiguous, as forward's callers pass them): causal
        # aligned to the bottom right
        if end == t:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=c.head_dim ** -0.5,
                                               enable_gqa=gqa)
        elif merged:
            y = attend_after_prefix(q, keys, values, end - t, c.head_dim ** -0.5, self.merge_by_lse)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(t, end),
                                               scale=c.head_dim ** -0.5, enable_gqa=gqa)
        return F.linear(y.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim), self.wo)


class DenseMLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor]):
        super().__init__()
        self.gate, self.up, self.down = (w[f"mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))

    def forward(self, x):
        return swiglu(x, self.gate, self.up, self.down)


def grouped_mm_serves(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes slabs of this shape and dtype: on CUDA in 16-bit (Hopper's
    kernel), on the CPU in any float dtype; rows a multiple of 16 bytes."""
    if device != x.device or not all(n * dtype.itemsize % 16 == 0 for n in shape[1:]):
        return False
    return dtype in (torch.bfloat16, torch.float16) if device.type == "cuda" else True


def quant_kernel_serves(device: torch.device, x: torch.Tensor) -> bool:
    """Whether the Triton grouped GEMM (moe_kernels.grouped_linear) runs a prompt's quantized experts: on
    CUDA, slabs on x's device. (Under Triton's interpreter it would run on the CPU too, slowly: tests ask.)"""
    return kernels.on_gpu(device) and device == x.device


class MoE(nn.Module):
    """Router exactly as transformers' TopKRouter. The (token, choice) pairs are grouped by expert on the
    device; the routed experts are made resident a wave at a time (all at once when the cache holds them,
    else in waves, in `step_accesses` order: see _waves), and each wave runs as two grouped GEMMs over the
    cache's slabs (each expert's weights read once per chunk), or one expert at a time where the grouped
    GEMM does not serve. Each (token, choice) pair's product is written once, unweighted, in the order the
    experts ran; `combine` weights and adds up each token's k (no atomics: the same sums every run)."""

    def __init__(self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], cache: ExpertCache, record,
                 fused: bool = False):
        super().__init__()
        self.cfg, self.layer, self.router, self.cache, self.record = cfg, layer, w["mlp.gate.weight"], cache, record
        self.silu_mul = prefill_kernels.silu_mul if fused else silu_mul
        self.combine = prefill_kernels.combine if fused else combine

    def route(self, flat):
        logits = F.linear(flat, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.cfg.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(logits.dtype), top_i

    def forward(self, x, deferred: list | None = None):
        """deferred: every expert of every layer is resident, so the host need not see this layer's routing
        before its experts run: it goes on this list, accounted after the forward (Transformer.settle)."""
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        top_w, top_i = self.route(flat)
        k = self.cfg.experts_per_token
        w1 = self.cache.slabs(self.layer)[0]
        if self.quantized_in_registers(flat):
            grouped = True  # the Triton grouped GEMM reads quantized slabs as stored; any shape
        else:  # quantized experts are dequantized (slabs) to the compute dtype before torch's grouped GEMM
            dtype = w1.dtype if self.cache.quant is None else flat.dtype
            grouped = grouped_mm_serves((w1.shape[0], w1.shape[1], h), dtype, w1.device, flat)
        if deferred is not None and grouped:
            deferred.append((self.layer, top_i, top_w))
            y, order = self._grouped(flat, top_i, list(range(self.cfg.num_experts)), b * t * k)
            return self._combine(y, order, top_w).view(b, t, h)
        # The one device-to-host sync of the layer: the host must know the experts to load them. Only the
        # counts per expert cross (not tokens x k ids: Python work per token would dominate a long prompt).
        counts = expert_counts(top_i.view(-1), self.cfg.num_experts).tolist()
        experts = [e for e, n in enumerate(counts) if n]  # step_accesses' order: ascending
        self.record(self.layer, top_i, top_w)
        if self.cache.keeps_step_resident and grouped:
            y, order = self._waves(flat, top_i, experts, counts, w1.shape[0])
        else:
            order = top_i.view(-1).argsort(stable=True)  # pairs grouped by expert
            y, start = torch.empty(b * t * k, h, dtype=flat.dtype, device=flat.device), 0
            for e in range(self.cfg.num_experts):
                if counts[e]:
                    y[start: start + counts[e]] = self._one(flat, e, order[start: start + counts[e]])
                start += counts[e]
        return self._combine(y, order, top_w).view(b, t, h)

    def _waves(self, flat, top_i, experts: list[int], counts: list[int], slots: int):
        """The routed experts in waves the cache holds (all of them in one, when it can), each a pair of
        grouped GEMMs. Loaded on a stream of their own, each wave's misses load while the wave before it
        runs, so a wave is half the cache (LRU then evicts the wave before that, whose work is done); loaded
        in line (the CPU), a wave is the whole cache, loaded once the wave before it is done. Returns
        (products, the pair of each row) as _grouped does, the waves' one after the other."""
        overlap = self.cache.loads_overlap
        size = slots if len(experts) <= slots or not overlap else max(1, slots // 2)
        waves = [experts[i: i + size] for i in range(0, len(experts), size)]
        self.cache.load_ahead(self.layer, waves[0])
        done = []
        for i, wave in enumerate(waves):
            self.cache.wait_loads()
            after = waves[i + 1] if i + 1 < len(waves) else None
            if after and overlap:
                self.cache.load_ahead(self.layer, after)
            done.append(self._grouped(flat, top_i, wave, sum(counts[e] for e in wave)))
            if after and not overlap:
                self.cache.load_ahead(self.layer, after)
        if len(done) == 1:
            return done[0]
        return torch.cat([y for y, _ in done]), torch.cat([order for _, order in done])

    def _combine(self, y, order, top_w):
        """y's row r is the product of pair order[r] (token * k + choice): each token's k weighted and added."""
        rows = torch.empty_like(order)
        rows[order] = positions(order.numel(), order.device)
        return self.combine(y, rows, top_w)

    def _grouped(self, flat, top_i, wave: list[int], pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts of `wave` (resident together: LRU evicts none of them for another) on their pairs:
        pairs sorted by slot, a grouped GEMM for gate and up and one for down over the slabs, each slot's
        rows one group. Returns (products [pairs, H], the pair of each row)."""
        in_registers = self.quantized_in_registers(flat)
        w1, w2, table = self.cache.slabs(self.layer) if in_registers else self.slabs(flat.dtype)
        k, slots = self.cfg.experts_per_token, w1.shape[0]
        ids = top_i.view(-1)
        if pairs == ids.numel():  # every pair is this wave's (one wave: a short prompt's ops are its time)
            sorted_key, order = torch.sort(table[ids], stable=True)
        else:
            in_wave = (ids >= wave[0]) & (ids <= wave[-1])  # a wave is a run of ascending experts
            key = torch.where(in_wave, table[ids], slots)  # pairs of other waves sort last, past every group
            sorted_key, order = torch.sort(key, stable=True)
            order = order[:pairs]
        # each slot's end among the sorted rows (torch._grouped_mm's offs), found on the device
        offs = torch.searchsorted(sorted_key, positions(slots, ids.device), right=True, out_int32=True)
        if in_registers:  # quantized slabs read as stored, dequantized a tile at a time
            s1, s2, bits, group = self.cache.quant_slabs(self.layer)
            gate_up = moe_kernels.grouped_linear(flat[order // k], w1, offs, (s1, bits, group))
            return moe_kernels.grouped_linear(self.silu_mul(gate_up), w2, offs, (s2, bits, group)), order
        gate_up = torch._grouped_mm(flat[order // k], w1.transpose(1, 2), offs=offs)
        return torch._grouped_mm(self.silu_mul(gate_up), w2.transpose(1, 2), offs=offs), order

    def quantized_in_registers(self, flat) -> bool:
        """Quantized experts, and the Triton grouped GEMM can read their slabs as stored (CUDA)."""
        return self.cache.quant is not None and quant_kernel_serves(self.cache.slabs(self.layer)[0].device, flat)

    def slabs(self, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache's slabs and table; quantized experts dequantized here, for torch's grouped GEMM (where
        the Triton one does not run: the CPU's path, correct, not fast)."""
        w1, w2, table = self.cache.slabs(self.layer)
        quant = self.cache.quant_slabs(self.layer)
        if quant is not None:
            s1, s2, bits, _ = quant
            w1, w2 = dequantize(w1, s1, bits, dtype), dequantize(w2, s2, bits, dtype)
        return w1, w2, table

    def _one(self, flat, e: int, pairs) -> torch.Tensor:
        """Expert e on its pairs (token * k + choice), fetched from the cache now."""
        gate, up, down = self.cache.get(self.layer, e)
        if gate.device != flat.device:  # unified memory: the prompt copies what it uses
            gate, up, down = (w.to(flat.device, non_blocking=True) for w in (gate, up, down))
        return swiglu(flat[pairs // self.cfg.experts_per_token], gate, up, down)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], cache: ExpertCache, record,
                 fused: bool = False):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.attn = Attention(cfg, layer, w, fused)
        self.mlp = MoE(cfg, layer, w, cache, record, fused) if cfg.has_experts(layer) else DenseMLP(w)
        self.ln1, self.ln2 = w["input_layernorm.weight"], w["post_attention_layernorm.weight"]
        self.rms_norm = kernels.rms_norm if fused else rms_norm

    @property
    def moe(self) -> MoE | None:
        return self.mlp if isinstance(self.mlp, MoE) else None

    def forward(self, x, kv, end, deferred=None):
        x = x + self.attn(self.rms_norm(x, self.ln1, self.eps), kv, end)
        h = self.rms_norm(x, self.ln2, self.eps)
        return x + (self.mlp(h, deferred) if self.moe is not None else self.mlp(h))


class Transformer(nn.Module):
    """`forward(input_ids [B,T], input_pos [T]) -> logits [B,T,V]` through the first `depth` layers.
    fused: the elementwise steps around the GEMMs through Triton (prefill_kernels.py; CUDA), else PyTorch."""

    def __init__(self, cfg: TextConfig, layout: Layout, dense: dict[str, torch.Tensor], cache: ExpertCache,
                 depth: int | None = None, trace: RouterTrace | None = None, fused: bool = False):
        super().__init__()
        depth = cfg.num_layers if depth is None else depth
        if not 1 <= depth <= cfg.num_layers:
            raise InputError(f"depth {depth} is out of range: the model has {cfg.num_layers} layers")
        self.cfg, self.layout, self.depth, self.cache = cfg, layout, depth, cache
        self.trace = RouterTrace() if trace is None else trace
        self.embed = dense[f"{layout.prefix}embed_tokens.weight"]
        self.norm = dense[f"{layout.prefix}norm.weight"]
        self.lm_head = dense.get(layout.lm_head)
        if self.lm_head is None:
            if not cfg.tie_word_embeddings:
                raise InputError(f"dense file lacks {layout.lm_head}")
            self.lm_head = self.embed
        self.layers = nn.ModuleList(
            Block(cfg, L, {k[len(layout.layer(L)):]: v for k, v in dense.items() if k.startswith(layout.layer(L))},
                  cache, self.record, fused)
            for L in range(depth))
        self.kv = KVCache(cfg, depth, self.embed.device, self.embed.dtype)
        self._positions: list[int] = []

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        self.kv.setup(max_batch, max_seq_len)

    def record(self, layer: int, top_i: torch.Tensor, top_w: torch.Tensor) -> None:
        """A MoE layer's routing [B*T, k] into the trace (when it records: the copy costs a sync)."""
        if self.trace.enabled:
            host = torch.stack((top_i.to(torch.float32), top_w.to(torch.float32))).cpu()
            self.trace.record(layer, host[0].to(torch.long).tolist(), host[1].tolist(), self._positions)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, positions: list[int] | None = None,
                keep: int | None = None, embeds: torch.Tensor | None = None, deepstack=None):
        """Every layer, each MoE layer showing its routing to the host and loading its experts before they
        run. positions: input_pos as host ints, when the caller has them (saves a device round trip).
        keep: logits of the last `keep` positions only ([B, keep, V]; a prompt needs its last one).
        embeds: the input embeddings instead of input_ids' (a multimodal prompt's, towers merged in);
        deepstack: (rows, [features per layer]), added to those rows' hidden states after the first layers
        as transformers' thinker adds the vision tower's deepstack features (batch 1)."""
        self._positions = input_pos.tolist() if positions is None else positions
        end = self.kv.end_of(self._positions)
        x = F.embedding(input_ids, self.embed) if embeds is None else embeds
        # With every expert resident (LRU, a pool per layer), no layer needs the host before its experts run:
        # their routing is accounted after the last layer, one host sync for the whole forward.
        c = self.cache
        deferred = [] if c.keeps_step_resident and c.scope == "per_layer" and c.holds_every_expert() else None
        for i, block in enumerate(self.layers):
            x = block(x, self.kv, end, deferred)
            if deepstack is not None and i < len(deepstack[1]):
                rows, features = deepstack[0], deepstack[1][i]
                x[:, rows] = x[:, rows] + features.to(x.dtype)
        if deferred:
            self.settle(deferred)
        return self.head(x if keep is None else x[:, x.shape[1] - keep:])

    def settle(self, deferred: list) -> None:
        """The deferred layers' routing, in layer order as if each had been seen when it ran: every expert
        a hit (its recency refreshed in step_accesses order), and the trace rows."""
        counts = expert_counts(torch.stack([top_i.view(-1) for _, top_i, _ in deferred]), self.cfg.num_experts).tolist()
        for (layer, top_i, top_w), n in zip(deferred, counts):
            self.cache.get_many(layer, [e for e, used in enumerate(n) if used])
            self.record(layer, top_i, top_w)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head)


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
