"""Fused Triton kernels for a prompt's many tokens on a GPU: the elementwise steps around its GEMMs, each
one pass over its tensors. In PyTorch each is a chain of kernels (casts, powers, means, products, sums, a
scatter), and at 8k tokens on an H100 those chains took as long as the GEMMs and attention together
(benchmarks/results/prefill_profile_h100.json).

  qkv_heads   from the fused QKV product: per-head RMSNorm and RoPE of q and k, and q, k, v laid out per
              head for attention
  silu_mul    SwiGLU's silu(gate) * up, from the grouped gate-and-up product
  combine     each token's k expert products, weighted by the router and added up (no scatter)
  merge_by_lse  a later prompt chunk's two attentions (its prefix, its own causal block) merged by their
              log-sum-exps in one pass

(A prompt's RMSNorm over its rows is kernels.rms_norm.) The model's PyTorch functions of the same names
(model.py) are the reference: each step rounds where they round, so in float32 they agree to rounding.
"""

from __future__ import annotations

import torch

from .kernels import interpreted, on_gpu, triton

if triton is not None:
    import triton.language as tl

    from .kernels import _norm_rope

    @triton.jit
    def _qkv_heads_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, t_len, start, n_heads,
                          n_kv, eps, HALF: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                          BLOCK_HALF: tl.constexpr):
        # Program r: token row r of [B, T]; every head of it. Outputs are [B, heads, T, D].
        r = tl.program_id(0)
        b, t = r // t_len, r % t_len
        D: tl.constexpr = 2 * HALF
        src = qkv_ptr + r.to(tl.int64) * (n_heads + 2 * n_kv) * D
        half = tl.arange(0, BLOCK_HALF)
        hmask = half < HALF
        dt = q_ptr.dtype.element_ty
        hq = tl.arange(0, BLOCK_Q)
        qmask = hq < n_heads
        qa, qb = _norm_rope(src, hq, qmask, qn_ptr, cos_ptr, sin_ptr, start + t, half, hmask, eps, dt, HALF)
        dst = q_ptr + ((b * n_heads + hq).to(tl.int64) * t_len + t)[:, None] * D + half[None, :]
        m = qmask[:, None] & hmask[None, :]
        tl.store(dst, qa.to(dt), mask=m)
        tl.store(dst + HALF, qb.to(dt), mask=m)
        hk = tl.arange(0, BLOCK_KV)
        kmask = hk < n_kv
        ka, kb = _norm_rope(src + n_heads * D, hk, kmask, kn_ptr, cos_ptr, sin_ptr, start + t, half, hmask, eps, dt,
                            HALF)
        dst = ((b * n_kv + hk).to(tl.int64) * t_len + t)[:, None] * D + half[None, :]
        m = kmask[:, None] & hmask[None, :]
        tl.store(k_ptr + dst, ka.to(dt), mask=m)
        tl.store(k_ptr + dst + HALF, kb.to(dt), mask=m)
        v_src = src + (n_heads + n_kv) * D + hk[:, None] * D + half[None, :]
        tl.store(v_ptr + dst, tl.load(v_src, mask=m, other=0.0), mask=m)
        tl.store(v_ptr + dst + HALF, tl.load(v_src + HALF, mask=m, other=0.0), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < n
        dt = out_ptr.dtype.element_ty
        g = tl.load(gu_ptr + r * 2 * n + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + r * 2 * n + n + c, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch's silu, rounded before the product
        tl.store(out_ptr + r * n + c, (s * u).to(dt), mask=m)

    @triton.jit
    def _combine_kernel(y_ptr, row_ptr, w_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
        # Program (token, column tile): its k products, each weighted and rounded (as transformers'
        # experts round theirs), added in float32 in choice order and rounded once.
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = c < H
        dt = out_ptr.dtype.element_ty
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(row_ptr + n * K + j).to(tl.int64)
            w = tl.load(w_ptr + n * K + j).to(tl.float32)
            y = tl.load(y_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
            total += (y * w).to(dt).to(tl.float32)
        tl.store(out_ptr + n * H + c, total.to(dt), mask=m)

    @triton.jit
    def _merge_kernel(a_ptr, la_ptr, b_ptr, lb_ptr, out_ptr, H, T, D, sa_b, sa_h, sa_t, sb_b, sb_h, sb_t, so_b, so_h,
                      so_t, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (batch row and head, block of queries); the last dimension contiguous everywhere
        bh = tl.program_id(0).to(tl.int64)
        b, h = bh // H, bh % H
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        tm = t < T
        m = tm[:, None] & (d < D)[None, :]
        la = tl.load(la_ptr + bh * T + t, mask=tm, other=0.0)
        lb = tl.load(lb_ptr + bh * T + t, mask=tm, other=0.0)
        top = tl.maximum(la, lb)
        wa, wb = tl.exp(la - top), tl.exp(lb - top)
        rows = t.to(tl.int64)[:, None]
        a = tl.load(a_ptr + b * sa_b + h * sa_h + rows * sa_t + d[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(b_ptr + b * sb_b + h * sb_h + rows * sb_t + d[None, :], mask=m, other=0.0).to(tl.float32)
        out = (a * wa[:, None] + x * wb[:, None]) / (wa + wb)[:, None]
        tl.store(out_ptr + b * so_b + h * so_h + rows * so_t + d[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


def serves(device: torch.device) -> bool:
    """Whether a prompt's steps take these kernels (where the decode kernels do, which also serve the
    checkpoint's dimensions): on CUDA. Under Triton's interpreter they would run on the CPU too, a program
    at a time (minutes for a long prompt): tests ask for them on short ones."""
    return on_gpu(device)


def _warps(n: int) -> dict:
    return {} if interpreted() else {"num_warps": 4 if n <= 1024 else 8}


def qkv_heads(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              start: int, n_heads: int, n_kv: int, eps: float):
    """qkv [B, T, (n_heads + 2 n_kv) * D] at positions start .. start + T - 1 -> q [B, n_heads, T, D] and
    k, v [B, n_kv, T, D]: q and k RMS-normed per head and rotated (cos, sin [S, D]: the KV cache's tables)."""
    b, t, _ = qkv.shape
    d = q_norm.numel()
    q = torch.empty(b, n_heads, t, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(b, n_kv, t, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    _qkv_heads_kernel[(b * t,)](qkv.contiguous(), q_norm, k_norm, cos, sin, q, k, v, t, start, n_heads, n_kv, eps,
                                HALF=d // 2, BLOCK_Q=triton.next_power_of_2(n_heads),
                                BLOCK_KV=triton.next_power_of_2(n_kv),
                                BLOCK_HALF=triton.next_power_of_2(d // 2), **_warps(n_heads * d))
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [P, 2I] (gate then up) -> silu(gate) * up [P, I]."""
    p, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(p, i, dtype=gate_up.dtype, device=gate_up.device)
    block = triton.next_power_of_2(i) if interpreted() else min(2048, triton.next_power_of_2(i))
    _silu_mul_kernel[(p, triton.cdiv(i, block))](gate_up.contiguous(), out, i, BLOCK=block, **_warps(block))
    return out


def combine(y: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [P, H] expert products in any order, rows [N * k]: the row of y holding token n's choice j,
    weights [N, k] -> [N, H]: sum over j of weights[n, j] * y[rows[n * k + j]]."""
    n, k = weights.shape
    h = y.shape[1]
    out = torch.empty(n, h, dtype=y.dtype, device=y.device)
    block = triton.next_power_of_2(h) if interpreted() else min(2048, triton.next_power_of_2(h))
    _combine_kernel[(n, triton.cdiv(h, block))](y, rows, weights.contiguous(), out, h, K=k, BLOCK_H=block,
                                                **_warps(block))
    return out


def merge_by_lse(a: torch.Tensor, lse_a: torch.Tensor, b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two attentions of the same queries [B, H, T, D] over disjoint keys, with their log-sum-exps [B, H, T]
    (float32): the attention over both ([B, H, T, D], laid out [B, T, H, D] as the output projection reads
    it)."""
    bs, h, t, d = a.shape
    out = torch.empty(bs, t, h, d, dtype=a.dtype, device=a.device).transpose(1, 2)
    a, b = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, b))
    lse_a, lse_b = (x.reshape(bs, h, t).float().contiguous() for x in (lse_a, lse_b))
    block_t = triton.next_power_of_2(t) if interpreted() else min(64, triton.next_power_of_2(t))
    _merge_kernel[(bs * h, triton.cdiv(t, block_t))](a, lse_a, b, lse_b, out, h, t, d, *a.stride()[:3], *b.stride()[:3],
                                                    *out.stride()[:3], BLOCK_T=block_t,
                                                    BLOCK_D=triton.next_power_of_2(d), **_warps(block_t * d))
    return out
