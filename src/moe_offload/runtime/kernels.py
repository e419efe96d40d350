"""Fused Triton kernels for decoding one token on a GPU (batch 1): the hot path's small steps in a few
launches, and what every kernel shares (tiles, programmatic dependent launch). The MoE layer's kernels
are in moe_kernels.py.

A decoded token is memory-bound: every weight it touches is read once. What makes it slow is everything
else: dozens of tiny kernels per layer (norms, RoPE, routing, casts), each with its launch and its ramp.
These fold the small steps into the products they feed:

  rms_norm / add_rms_norm   the residual add and RMSNorm of a layer in one pass (dense layers)
  attention                 from the fused QKV output: per-head RMSNorm of q and k, RoPE, the K/V cache
                            write, and one query over the cache up to its position, GQA heads read in place
  linear, norm_linear       a one-token GEMV, optionally after the (residual add and) RMSNorm feeding it

Every step rounds where transformers rounds (each projection's output, the norm before its weight) and
accumulates in float32, so in float32 they agree with the PyTorch path to rounding. They run on CUDA, and
on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests them against the
PyTorch path.
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
    def _wait_for_inputs(PDL: tl.constexpr):
        # With programmatic dependent launch (PDL) a kernel starts while the one before it finishes, so
        # what it reads before this point must not come from that kernel: weights, or what the kernel
        # before that one wrote. Letting the next kernel start only past this point keeps that true.
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, sum_ptr, n, eps, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
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
    def _norm_rope(src, norm_ptr, cos_ptr, sin_ptr, pos, half, eps, dt, D: tl.constexpr):
        """One head of q or k [D] from the QKV product: per-head RMSNorm, then RoPE (rotate-half form),
        each step rounded to dt as transformers' elementwise ops round. Returns the two halves (float32)."""
        a = tl.load(src + half).to(tl.float32)
        b = tl.load(src + D // 2 + half).to(tl.float32)
        inv = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
        a = (tl.load(norm_ptr + half).to(tl.float32) * (a * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        b = (tl.load(norm_ptr + D // 2 + half).to(tl.float32) * (b * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        c = tl.load(cos_ptr + pos * D + half).to(tl.float32)  # cos = cat(freqs, freqs).cos(): halves equal
        s = tl.load(sin_ptr + pos * D + half).to(tl.float32)
        ra = ((a * c).to(dt).to(tl.float32) + (-b * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        rb = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        return ra, rb

    @triton.jit
    def _attention_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, mask_ptr,
                          out_ptr, n_heads, n_kv, head_stride, eps, scale, GROUP: tl.constexpr, D: tl.constexpr,
                          BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        # One query head per program: its q, and its KV head's k and v for this token, normed and rotated
        # from the QKV product (the first program of each group writes k and v into the cache); then an
        # online softmax in float32 over the cache up to the token (later entries are masked out anyway,
        # so a long cache costs only what is filled), the KV heads read in place rather than repeated for
        # GQA, and the token's own entry last.
        _wait_for_inputs(PDL)
        head = tl.program_id(0)
        kv = head // GROUP
        half = tl.arange(0, D // 2)
        dt = out_ptr.dtype.element_ty
        pos = tl.load(pos_ptr)
        qa, qb = _norm_rope(qkv_ptr + head * D, qn_ptr, cos_ptr, sin_ptr, pos, half, eps, dt, D)
        ka, kb = _norm_rope(qkv_ptr + (n_heads + kv) * D, kn_ptr, cos_ptr, sin_ptr, pos, half, eps, dt, D)
        va = tl.load(qkv_ptr + (n_heads + n_kv + kv) * D + half).to(tl.float32)
        vb = tl.load(qkv_ptr + (n_heads + n_kv + kv) * D + D // 2 + half).to(tl.float32)
        k_base = k_cache_ptr + kv * head_stride
        v_base = v_cache_ptr + kv * head_stride
        if head % GROUP == 0:
            tl.store(k_base + pos * D + half, ka.to(dt))
            tl.store(k_base + pos * D + D // 2 + half, kb.to(dt))
            tl.store(v_base + pos * D + half, va.to(dt))
            tl.store(v_base + pos * D + D // 2 + half, vb.to(dt))
        m_i = (tl.sum(qa * ka, axis=0) + tl.sum(qb * kb, axis=0)) * scale  # the token's own score comes first
        l_i = m_i * 0.0 + 1.0
        acc_a, acc_b = va, vb
        s0 = pos * 0
        while s0 < pos:  # (a while: Triton's interpreter cannot take a loaded bound in range())
            s = s0 + tl.arange(0, BLOCK_S)
            inside = s < pos
            keep = inside & (tl.load(mask_ptr + s, mask=inside, other=0) != 0)
            rows = s[:, None] * D + half[None, :]
            k_a = tl.load(k_base + rows, mask=inside[:, None], other=0.0).to(tl.float32)
            k_b = tl.load(k_base + rows + D // 2, mask=inside[:, None], other=0.0).to(tl.float32)
            v_a = tl.load(v_base + rows, mask=inside[:, None], other=0.0).to(tl.float32)
            v_b = tl.load(v_base + rows + D // 2, mask=inside[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(k_a * qa[None, :], axis=1) + tl.sum(k_b * qb[None, :], axis=1)
            scores = tl.where(keep, scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc_a = acc_a * alpha + tl.sum(p[:, None] * v_a, axis=0)
            acc_b = acc_b * alpha + tl.sum(p[:, None] * v_b, axis=0)
            m_i = m_new
            s0 += BLOCK_S
        tl.store(out_ptr + head * D + half, (acc_a / l_i).to(dt))
        tl.store(out_ptr + head * D + D // 2 + half, (acc_b / l_i).to(dt))

    @triton.jit
    def _gemv_kernel(x_ptr, delta_ptr, norm_ptr, w_ptr, sum_ptr, normed_ptr, out_ptr, n_rows, eps, K: tl.constexpr,
                     NORM: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
        # W @ x for one token, whole rows of W per program; with NORM, [x + delta ->] RMSNorm first, in the
        # same launch: every program normalises the whole (small) vector itself, rounding as
        # _rms_norm_kernel does.
        cols = tl.arange(0, BLOCK_K)
        col_mask = cols < K
        first = tl.program_id(0).to(tl.int64) * BLOCK_N  # 64-bit: W may hold more than 2**31 elements
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        # W's rows first, before the wait: their read, the bulk of the time, overlaps the kernel before
        w = tl.load(w_ptr + first * K + tl.arange(0, BLOCK_N)[:, None] * K + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        _wait_for_inputs(PDL)
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
        if NORM:
            if HAS_DELTA:  # the new residual stream, rounded as transformers adds
                x = (x.to(tl.float32) + tl.load(delta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)).to(dt)
                if tl.program_id(0) == 0:
                    tl.store(sum_ptr + cols, x, mask=col_mask)
            h = x.to(tl.float32)
            h = (h * tl.rsqrt(tl.sum(h * h, axis=0) / K + eps)).to(dt).to(tl.float32)
            x = (tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * h).to(dt)
            if tl.program_id(0) == 0:  # the normed vector, for what comes next
                tl.store(normed_ptr + cols, x, mask=col_mask)
        acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + rows, acc.to(dt), mask=row_mask)


# Tile shapes (moe_kernels.py has its own): the GEMV kernels read [rows, cols] tiles with cols contiguous.
# The fastest of a sweep on an H100 at the real model's dims, each kernel timed inside a CUDA graph with
# its weights out of L2 (benchmarks/kernel_speed.py); valid for any size.
GEMV_BLOCKS = dict(BLOCK_N=2, num_warps=8)  # whole rows: BLOCK_K is the vector's length
ATTENTION_BLOCKS = dict(BLOCK_S=128, num_warps=8)
# The one-program kernels (norm, route) and the per-head one: a vector of a few thousand elements,
# whose reductions within one warp are shuffles, with no shared memory and no barrier.
SMALL_BLOCKS = dict(num_warps=1)

# Programmatic dependent launch (Hopper and later): each kernel is launched while the one before it
# finishes, reads its weights, and waits (_wait_for_inputs) only for the inputs that kernel writes.
PDL = True
_pdl_devices: dict[torch.device, bool] = {}


def _launch(device: torch.device) -> dict:
    """The PDL constexpr and launch option for kernels on `device` (off under the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda" or not PDL:
        return {"PDL": False}
    if device not in _pdl_devices:
        _pdl_devices[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if _pdl_devices[device] else {"PDL": False}


def _small() -> dict:
    return {} if os.environ.get("TRITON_INTERPRET") == "1" else SMALL_BLOCKS


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
                           HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n), **_small(),
                           **_launch(x.device))
    return (out, summed) if delta is not None else out


def attention(qkv: torch.Tensor, q_norm, k_norm, cos, sin, pos, k_cache, v_cache, mask, n_heads: int, n_kv: int,
              eps: float, scale: float) -> torch.Tensor:
    """One token of batch row 0 from its QKV product qkv [(n_heads + 2 n_kv) * D]: per-head RMSNorm of q
    and k, RoPE, k and v written into row 0 of the caches [B, n_kv, S, D] at position pos[0], and
    softmax(q k^T * scale) v over positions 0..pos[0] where mask [S] is True (the token always sees
    itself). Returns [n_heads * D]."""
    d = q_norm.numel()
    out = torch.empty(n_heads * d, dtype=qkv.dtype, device=qkv.device)
    b = _blocks(ATTENTION_BLOCKS, BLOCK_S=k_cache.shape[2])
    _attention_kernel[(n_heads,)](qkv, q_norm, k_norm, cos, sin, pos, k_cache, v_cache, mask.view(torch.uint8), out,
                                  n_heads, n_kv, k_cache.stride(1), eps, scale, GROUP=n_heads // n_kv, D=d, **b,
                                  **_launch(qkv.device))
    return out


def _gemv(x, w, norm=None, eps=0.0, delta=None):
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    normed = torch.empty_like(x) if norm is not None else out
    summed = torch.empty_like(x) if delta is not None else normed
    b = _blocks(GEMV_BLOCKS, BLOCK_N=n)
    _gemv_kernel[(triton.cdiv(n, b["BLOCK_N"]),)](x, x if delta is None else delta, w if norm is None else norm, w,
                                                  summed, normed, out, n, eps, K=k, NORM=norm is not None,
                                                  HAS_DELTA=delta is not None, BLOCK_K=triton.next_power_of_2(k), **b,
                                                  **_launch(x.device))
    return out, normed, summed


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for one token (x [K], w [N, K] contiguous, K up to a few thousand: whole rows per
    program), accumulated in float32 and rounded once, as cuBLAS rounds."""
    return _gemv(x, w)[0]


def norm_linear(x: torch.Tensor, norm: torch.Tensor, eps: float, w: torch.Tensor, delta: torch.Tensor | None = None):
    """F.linear(rms_norm(x [+ delta]) * norm, w) for one token (x [K], w [N, K] contiguous) in one launch.
    Returns the product [N]; with delta, (product, normed, x + delta) (the new residual stream)."""
    out, normed, summed = _gemv(x, w, norm, eps, delta)
    return (out, normed, summed) if delta is not None else out
