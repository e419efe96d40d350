"""Fused Triton kernels for decoding one token on a GPU (batch 1): the hot path's small steps in a few launches.

A decoded token is memory-bound: every weight it touches is read once. What makes it slow is everything
else: dozens of tiny kernels per layer (norms, RoPE, routing, casts) and, for the experts, copying the k
routed experts' weights out of the cache's slabs before multiplying (`w1[slots]` reads and writes them
again). These kernels read the routed experts' slots in place and fold the small steps together:

  rms_norm / add_rms_norm   the residual add and RMSNorm of a layer in one pass
  qk_norm_rope_kv           per-head RMSNorm of q and k, RoPE, and the K/V cache write, from the fused QKV output
  route                     softmax, top-k, renormalisation and the slot lookup (expert -> slab slot)
  moe_gate_up, moe_down     the k experts' SwiGLU straight from the slabs, weighted and added to the residual

Every step rounds where transformers rounds (each projection's output, the norm before its weight, the
routing weights) and accumulates in float32, so in float32 they agree with the PyTorch path to rounding.
They run on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests
them against the PyTorch path.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; the CPU path does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run for tensors on `device`."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, sum_ptr, n, eps, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if HAS_DELTA:  # the residual stream: x + delta, rounded to the compute dtype as transformers adds
            x = (x.to(tl.float32) + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + offs, x, mask=mask)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)
        h = h.to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight, as transformers does
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kv_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr,
                                v_cache_ptr, n_heads, n_kv, cache_head_stride, eps, D: tl.constexpr):
        head = tl.program_id(0)
        half = tl.arange(0, D // 2)
        pos = tl.load(pos_ptr)
        src = qkv_ptr + head * D
        a = tl.load(src + half).to(tl.float32)
        b = tl.load(src + D // 2 + half).to(tl.float32)
        dt = q_out_ptr.dtype.element_ty
        if head < n_heads + n_kv:  # q or k: per-head RMSNorm, then RoPE (rotate-half form)
            is_q = head < n_heads
            inv = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
            a = (a * inv).to(dt).to(tl.float32)
            b = (b * inv).to(dt).to(tl.float32)
            if is_q:
                wa = tl.load(qn_ptr + half).to(tl.float32)
                wb = tl.load(qn_ptr + D // 2 + half).to(tl.float32)
            else:
                wa = tl.load(kn_ptr + half).to(tl.float32)
                wb = tl.load(kn_ptr + D // 2 + half).to(tl.float32)
            a = (wa * a).to(dt).to(tl.float32)
            b = (wb * b).to(dt).to(tl.float32)
            c = tl.load(cos_ptr + pos * D + half).to(tl.float32)  # cos = cat(freqs, freqs).cos(): halves equal
            s = tl.load(sin_ptr + pos * D + half).to(tl.float32)
            # q*cos + rotate_half(q)*sin, each product rounded as transformers' elementwise ops round
            ra = ((a * c).to(dt).to(tl.float32) + (-b * s).to(dt).to(tl.float32)).to(dt)
            rb = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
            if is_q:
                tl.store(q_out_ptr + head * D + half, ra)
                tl.store(q_out_ptr + head * D + D // 2 + half, rb)
            else:
                dst = k_cache_ptr + (head - n_heads) * cache_head_stride + pos * D
                tl.store(dst + half, ra)
                tl.store(dst + D // 2 + half, rb)
        else:  # v: straight into the cache
            dst = v_cache_ptr + (head - n_heads - n_kv) * cache_head_stride + pos * D
            tl.store(dst + half, a.to(dt))
            tl.store(dst + D // 2 + half, b.to(dt))

    @triton.jit
    def _route_kernel(logits_ptr, table_ptr, top_i_ptr, top_w_ptr, slots_ptr, record_ptr, n_experts, K: tl.constexpr,
                      NORM: tl.constexpr, RECORD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        offs = tl.arange(0, BLOCK_E)
        mask = offs < n_experts
        logits = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)  # softmax in float32, as transformers' router
        p = tl.where(mask, p, -1.0)
        ks = tl.arange(0, BLOCK_K)
        chosen_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        chosen_i = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(K):  # top-k by repeated arg-max; ties go to the lower expert index
            best = tl.max(p, axis=0)
            idx = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)
            chosen_w = tl.where(ks == j, best, chosen_w)
            chosen_i = tl.where(ks == j, idx.to(tl.int64), chosen_i)
            p = tl.where(offs == idx, -1.0, p)
        if NORM:
            chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
        kmask = ks < K
        slots = tl.load(table_ptr + chosen_i, mask=kmask, other=0)
        tl.store(top_i_ptr + ks, chosen_i, mask=kmask)
        chosen_w = chosen_w.to(top_w_ptr.dtype.element_ty)
        tl.store(top_w_ptr + ks, chosen_w, mask=kmask)
        if RECORD:  # [experts; weights] as float32, for the host
            tl.store(record_ptr + ks, chosen_i.to(tl.float32), mask=kmask)
            tl.store(record_ptr + K + ks, chosen_w.to(tl.float32), mask=kmask)
        # an absent expert (slot -1) reads slot 0 instead: the step is redone once the host sees the miss
        tl.store(slots_ptr + ks, tl.maximum(slots, 0), mask=kmask)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w1_ptr, slots_ptr, act_ptr, slot_stride, H: tl.constexpr, I: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
        e = tl.program_id(0)  # which of the token's k experts
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_mask = rows < I
        base = w1_ptr + tl.load(slots_ptr + e) * slot_stride
        gate = tl.zeros([BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_I], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            m = row_mask[:, None] & col_mask[None, :]
            wg = tl.load(base + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
            wu = tl.load(base + (rows[:, None] + I) * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
            gate += tl.sum(wg * x[None, :], axis=1)
            up += tl.sum(wu * x[None, :], axis=1)
        dt = act_ptr.dtype.element_ty
        gate = gate.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(act_ptr + e * I + rows, (silu * up).to(dt), mask=row_mask)

    @triton.jit
    def _moe_down_kernel(act_ptr, w2_ptr, slots_ptr, weights_ptr, resid_ptr, out_ptr, slot_stride, K: tl.constexpr,
                         H: tl.constexpr, I: tl.constexpr, HAS_RESID: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_I: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = rows < H
        dt = out_ptr.dtype.element_ty
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        for e in tl.static_range(K):
            base = w2_ptr + tl.load(slots_ptr + e) * slot_stride
            y = tl.zeros([BLOCK_H], dtype=tl.float32)
            for i0 in range(0, I, BLOCK_I):
                cols = i0 + tl.arange(0, BLOCK_I)
                col_mask = cols < I
                a = tl.load(act_ptr + e * I + cols, mask=col_mask, other=0.0).to(tl.float32)
                w = tl.load(base + rows[:, None] * I + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                            other=0.0).to(tl.float32)
                y += tl.sum(w * a[None, :], axis=1)
            weight = tl.load(weights_ptr + e).to(tl.float32)
            total += (y.to(dt).to(tl.float32) * weight).to(dt).to(tl.float32)
        total = total.to(dt)
        if HAS_RESID:
            total = (tl.load(resid_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) + total.to(tl.float32)).to(dt)
        tl.store(out_ptr + rows, total, mask=row_mask)


# Tile shapes: the GEMV kernels read [rows, cols] tiles with cols contiguous. The fastest of a sweep on an
# H100 at the real model's dims (benchmarks/kernel_speed.py: 0.61 and 0.41 of the HBM bound alone, against
# 0.37 and 0.27 for the first guess); valid for any size.
GATE_UP_BLOCKS = dict(BLOCK_I=8, BLOCK_H=512, num_warps=2)
DOWN_BLOCKS = dict(BLOCK_H=4, BLOCK_I=256, num_warps=4)


def _blocks(tuned: dict, **dims: int) -> dict:
    """Tile sizes no larger than the matrix; under Triton's interpreter, which pays per program and per
    operation rather than per element, one tile covers the whole dimension."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {k: triton.next_power_of_2(n) for k, n in dims.items()}
    return {"num_warps": tuned["num_warps"], **{k: min(tuned[k], triton.next_power_of_2(n)) for k, n in dims.items()}}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """One row: RMSNorm(x + delta) * weight. Returns (normed, x + delta) (the new residual stream) when
    delta is given, else normed."""
    n = x.numel()
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if delta is not None else out
    _rms_norm_kernel[(1,)](x, delta if delta is not None else x, weight, out, summed, n, eps,
                           HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n))
    return (out, summed) if delta is not None else out


def qk_norm_rope_kv(qkv: torch.Tensor, q_norm, k_norm, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int,
                    eps: float) -> torch.Tensor:
    """qkv [(n_heads + 2 n_kv) * D] of one token -> q [n_heads, D] normed and rotated; k (normed,
    rotated) and v written into row 0 of the caches [B, n_kv, S, D] at position pos[0]."""
    d = q_norm.numel()
    q = torch.empty(n_heads, d, dtype=qkv.dtype, device=qkv.device)
    _qk_norm_rope_kv_kernel[(n_heads + 2 * n_kv,)](qkv, q_norm, k_norm, cos, sin, pos, q, k_cache, v_cache, n_heads,
                                                   n_kv, k_cache.stride(1), eps, D=d)
    return q


def route(logits: torch.Tensor, table: torch.Tensor, k: int, norm_topk_prob: bool, record: torch.Tensor | None = None):
    """Router logits [E] of one token -> (top_i [k], top_w [k] in the logits' dtype, slots [k]); also
    written as float32 into record [2, k] when given."""
    e = logits.numel()
    top_i = torch.empty(k, dtype=torch.long, device=logits.device)
    top_w = torch.empty(k, dtype=logits.dtype, device=logits.device)
    slots = torch.empty(k, dtype=torch.long, device=logits.device)
    _route_kernel[(1,)](logits, table, top_i, top_w, slots, top_w if record is None else record, e, K=k,
                        NORM=norm_topk_prob, RECORD=record is not None, BLOCK_E=triton.next_power_of_2(e),
                        BLOCK_K=triton.next_power_of_2(k))
    return top_i, top_w, slots


def moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
        resid: torch.Tensor | None = None) -> torch.Tensor:
    """[resid +] sum_j weights[j] * down_j(silu(gate_j x) * up_j x) for one token, the experts read in place
    from the slabs w1 [S, 2I, H] and w2 [S, H, I] at `slots`."""
    k, (_, two_i, h) = slots.numel(), w1.shape
    i = two_i // 2
    act = torch.empty(k, i, dtype=x.dtype, device=x.device)
    gu = _blocks(GATE_UP_BLOCKS, BLOCK_I=i, BLOCK_H=h)
    _moe_gate_up_kernel[(k, triton.cdiv(i, gu["BLOCK_I"]))](x, w1, slots, act, w1.stride(0), H=h, I=i, **gu)
    out = torch.empty_like(x)
    dn = _blocks(DOWN_BLOCKS, BLOCK_H=h, BLOCK_I=i)
    _moe_down_kernel[(triton.cdiv(h, dn["BLOCK_H"]),)](act, w2, slots, weights, x if resid is None else resid, out,
                                                      w2.stride(0), K=k, H=h, I=i, HAS_RESID=resid is not None, **dn)
    return out
