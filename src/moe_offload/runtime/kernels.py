"""Fused Triton kernels for decoding one token on a GPU (batch 1): the hot path's small steps in a few
launches, and what every kernel shares (tiles, programmatic dependent launch). The MoE layer's kernels
are in moe_kernels.py.

A decoded token is memory-bound: every weight it touches is read once. What makes it slow is everything
else: dozens of tiny kernels per layer (norms, RoPE, routing, casts), each with its launch and its ramp.
These fold the small steps into the products they feed:

  rms_norm / add_rms_norm   the residual add and RMSNorm of a layer in one pass (dense layers; a prompt's
                            rows too, a program each)
  attention                 from the fused QKV output: per-head RMSNorm of q and k, RoPE, the K/V cache
                            write, and one query over the cache up to its position, GQA heads read in place,
                            split along the cache; a second kernel merges the splits, a program per head
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


MAX_ROW = 16384  # elements: the GEMVs and the down projection hold whole rows of a weight in registers


def unserved(hidden_size: int, head_dim: int, moe_intermediate_size: int) -> str | None:
    """Why the kernels cannot serve a checkpoint of these dimensions, or None. Tiles are masked, so any size
    up to MAX_ROW serves, and any quantization scheme checkpoint.quantize builds (its group size divides
    both dimensions); RoPE's rotate-half needs an even head_dim."""
    if head_dim % 2:
        return f"head_dim {head_dim} is odd (RoPE rotates halves)"
    for name, n in (("hidden_size", hidden_size), ("moe_intermediate_size", moe_intermediate_size)):
        if n > MAX_ROW:
            return f"{name} {n} is past the {MAX_ROW} elements a kernel holds in one row"
    return None


def interpreted() -> bool:
    """Triton's interpreter runs the kernels (on the CPU: how the tests check them)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run for tensors on `device`."""
    if triton is None:
        return False
    return device.type == "cuda" or interpreted()


def on_gpu(device: torch.device) -> bool:
    """Whether the kernels run by default for `device`: on CUDA, where Triton is (the interpreter, which
    runs them on the CPU a program at a time, only where a caller asks for them)."""
    return device.type == "cuda" and triton is not None


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
        row = tl.program_id(0).to(tl.int64) * n  # a program per row (a prompt's tokens; one when decoding)
        x = tl.load(x_ptr + row + offs, mask=mask, other=0.0)
        if HAS_DELTA:  # the residual stream: x + delta, rounded to the compute dtype as transformers adds
            x = (x.to(tl.float32) + tl.load(delta_ptr + row + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row + offs, x, mask=mask)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)
        h = h.to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight, as transformers does
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope(src, rows, rmask, norm_ptr, cos_ptr, sin_ptr, pos, half, hmask, eps, dt, HALF: tl.constexpr):
        """Heads `rows` of q or k (2 HALF elements each, from src) from the QKV product: per-head RMSNorm, then
        RoPE (rotate-half form), each step rounded to dt as transformers' elementwise ops round. Returns the
        two halves [rows, halves] (float32; zero in the tile's masked tail)."""
        m = rmask[:, None] & hmask[None, :]
        offs = rows[:, None] * (2 * HALF) + half[None, :]
        a = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(src + offs + HALF, mask=m, other=0.0).to(tl.float32)
        inv = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)[:, None]
        na = tl.load(norm_ptr + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        nb = tl.load(norm_ptr + HALF + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a = (na * (a * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        b = (nb * (b * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        c = tl.load(cos_ptr + pos * 2 * HALF + half, mask=hmask, other=0.0).to(tl.float32)[None, :]  # halves equal
        s = tl.load(sin_ptr + pos * 2 * HALF + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        ra = ((a * c).to(dt).to(tl.float32) + (-b * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        rb = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        return ra, rb

    @triton.jit
    def _attention_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, mask_ptr,
                          out_ptr, part_ptr, stat_ptr, n_heads, n_kv, head_stride, chunk, n_splits, eps, scale,
                          GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                          PDL: tl.constexpr):
        # Split along the KV cache (flash-decoding), so that one token keeps every SM busy: program
        # (kv head, split) takes the GROUP query heads that share a KV head over cache positions
        # [split * chunk, (split + 1) * chunk) below the token's, so each K and V tile is read once for
        # all of them (GQA) and their scores are one tensor-core product. Each program norms and rotates
        # its heads' q (and the KV head's k) from the QKV product; split 0 writes the token's k and v into
        # the cache and counts the token's own entry. Each split keeps an online softmax in float32;
        # SPLIT: it stores it for _merge_splits_kernel, else (one range) it writes the heads' output.
        _wait_for_inputs(PDL)
        kv = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        gmask = g < GROUP
        half = tl.arange(0, BLOCK_HALF)
        hmask = half < HALF
        m2 = gmask[:, None] & hmask[None, :]
        dt = out_ptr.dtype.element_ty
        pos = tl.load(pos_ptr)
        heads = kv * GROUP + g
        qa, qb = _norm_rope(qkv_ptr, heads, gmask, qn_ptr, cos_ptr, sin_ptr, pos, half, hmask, eps, dt, HALF)
        one = tl.arange(0, 1)
        ka, kb = _norm_rope(qkv_ptr + (n_heads + kv) * D, one, one == 0, kn_ptr, cos_ptr, sin_ptr, pos, half, hmask,
                            eps, dt, HALF)  # [1, halves]
        v_src = qkv_ptr + (n_heads + n_kv + kv) * D + half[None, :]
        va = tl.load(v_src, mask=hmask[None, :], other=0.0).to(tl.float32)
        vb = tl.load(v_src + HALF, mask=hmask[None, :], other=0.0).to(tl.float32)
        k_base = k_cache_ptr + kv * head_stride
        v_base = v_cache_ptr + kv * head_stride
        first = split == 0
        if first:
            here = pos * D + half[None, :]
            tl.store(k_base + here, ka.to(dt), mask=hmask[None, :])
            tl.store(k_base + here + HALF, kb.to(dt), mask=hmask[None, :])
            tl.store(v_base + here, va.to(dt), mask=hmask[None, :])
            tl.store(v_base + here + HALF, vb.to(dt), mask=hmask[None, :])
        own = (tl.sum(qa * ka, axis=1) + tl.sum(qb * kb, axis=1)) * scale  # [heads]: the token's own score
        m_i = tl.where(first, own, float("-inf"))
        l_i = tl.where(first, 1.0, 0.0) + own * 0.0
        acc_a = tl.where(first, va + qa * 0.0, 0.0)  # [heads, halves]
        acc_b = tl.where(first, vb + qb * 0.0, 0.0)
        # the products' inputs: the cache's dtype on tensor cores (q is exact in it: rounded to dt above), or
        # float32 products in IEEE precision (float32 runs: no TF32; Triton's interpreter: no bf16 product)
        tdt = tl.float32 if IEEE else k_cache_ptr.dtype.element_ty
        precision: tl.constexpr = "ieee" if IEEE else "tf32"
        qa_t = qa.to(tdt)
        qb_t = qb.to(tdt)
        s0 = split * chunk
        end = tl.minimum(s0 + chunk, pos)
        while s0 < end:  # (a while: Triton's interpreter cannot take a loaded bound in range())
            s = s0 + tl.arange(0, BLOCK_S)
            inside = s < end
            keep = inside & (tl.load(mask_ptr + s, mask=inside, other=0) != 0)
            rows = s[:, None] * D + half[None, :]
            t_mask = inside[:, None] & hmask[None, :]
            k_a = tl.load(k_base + rows, mask=t_mask, other=0.0).to(tdt)
            k_b = tl.load(k_base + rows + HALF, mask=t_mask, other=0.0).to(tdt)
            scores = tl.dot(qa_t, tl.trans(k_a), input_precision=precision)
            scores += tl.dot(qb_t, tl.trans(k_b), input_precision=precision)  # [heads, positions]
            scores = tl.where(keep[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: no inf - inf
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_a = tl.load(v_base + rows, mask=t_mask, other=0.0).to(tdt)
            v_b = tl.load(v_base + rows + HALF, mask=t_mask, other=0.0).to(tdt)
            p_t = p.to(tdt)  # as flash attention: the probabilities in the inputs' dtype for the product
            acc_a = acc_a * alpha[:, None] + tl.dot(p_t, v_a, input_precision=precision)
            acc_b = acc_b * alpha[:, None] + tl.dot(p_t, v_b, input_precision=precision)
            m_i = m_new
            s0 += BLOCK_S
        if SPLIT:
            mine = heads * n_splits + split
            tl.store(stat_ptr + mine * 2, m_i, mask=gmask)
            tl.store(stat_ptr + mine * 2 + 1, l_i, mask=gmask)
            tl.store(part_ptr + mine[:, None] * D + half[None, :], acc_a, mask=m2)
            tl.store(part_ptr + mine[:, None] * D + HALF + half[None, :], acc_b, mask=m2)
        else:
            tl.store(out_ptr + heads[:, None] * D + half[None, :], (acc_a / l_i[:, None]).to(dt), mask=m2)
            tl.store(out_ptr + heads[:, None] * D + HALF + half[None, :], (acc_b / l_i[:, None]).to(dt), mask=m2)

    @triton.jit
    def _merge_splits_kernel(part_ptr, stat_ptr, out_ptr, n_splits, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr):
        # One program per query head: its splits' partial attentions merged by log-sum-exp, in split
        # order, all read at once (a program per head, so the heads' merges run side by side)
        _wait_for_inputs(PDL)
        head = tl.program_id(0)
        sp = tl.arange(0, BLOCK_SPLITS)
        smask = sp < n_splits
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        rows = head * n_splits + sp
        m = tl.load(stat_ptr + rows * 2, mask=smask, other=float("-inf"))
        big = tl.max(m, axis=0)  # finite: split 0 holds the token's own score
        w = tl.where(smask & (m > float("-inf")), tl.exp(m - big), 0.0)
        l_sum = tl.sum(w * tl.load(stat_ptr + rows * 2 + 1, mask=smask, other=0.0), axis=0)
        part = tl.load(part_ptr + rows[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        tl.store(out_ptr + head * D + d, (tl.sum(w[:, None] * part, axis=0) / l_sum).to(out_ptr.dtype.element_ty),
                 mask=dmask)

    @triton.jit
    def _gemv_kernel(x_ptr, delta_ptr, norm_ptr, w_ptr, sum_ptr, normed_ptr, out_ptr, n_rows, step, eps,
                     K: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr, LOOP: tl.constexpr = False):
        # W @ x for one token, whole rows of W per tile (BLOCK_N rows); with NORM, [x + delta ->] RMSNorm
        # first, in the same launch: every program normalises the whole (small) vector itself, once,
        # rounding as _rms_norm_kernel does. A program per tile, or (LOOP) fewer: each takes tiles pid,
        # pid + step, ..., reading a tile's rows while it sums the one before (a sweep candidate: measured
        # against a program per tile by benchmarks/kernel_speed.py)
        cols = tl.arange(0, BLOCK_K)
        col_mask = cols < K
        r = tl.arange(0, BLOCK_N)
        pid = tl.program_id(0)
        first = pid.to(tl.int64) * BLOCK_N  # 64-bit: W may hold more than 2**31 elements
        rows = first + r
        # W's rows first, before the wait: their read, the bulk of the time, overlaps the kernel before
        w = tl.load(w_ptr + first * K + r[:, None] * K + cols[None, :],
                    mask=(rows < n_rows)[:, None] & col_mask[None, :], other=0.0)
        _wait_for_inputs(PDL)
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
        if NORM:
            if HAS_DELTA:  # the new residual stream, rounded as transformers adds
                x = (x.to(tl.float32) + tl.load(delta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)).to(dt)
                if pid == 0:
                    tl.store(sum_ptr + cols, x, mask=col_mask)
            h = x.to(tl.float32)
            h = (h * tl.rsqrt(tl.sum(h * h, axis=0) / K + eps)).to(dt).to(tl.float32)
            x = (tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * h).to(dt)
            if pid == 0:  # the normed vector, for what comes next
                tl.store(normed_ptr + cols, x, mask=col_mask)
        if LOOP:
            xf = x.to(tl.float32)[None, :]
            tile = pid
            while tile * BLOCK_N < n_rows:  # (a while: the interpreter takes no program-dependent range() bound)
                nxt = (tile + step).to(tl.int64) * BLOCK_N
                w_next = tl.load(w_ptr + nxt * K + r[:, None] * K + cols[None, :],
                                 mask=(nxt + r < n_rows)[:, None] & col_mask[None, :], other=0.0)
                rows = tile.to(tl.int64) * BLOCK_N + r
                tl.store(out_ptr + rows, tl.sum(w.to(tl.float32) * xf, axis=1).to(dt), mask=rows < n_rows)
                w = w_next
                tile += step
        else:
            acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            tl.store(out_ptr + rows, acc.to(dt), mask=rows < n_rows)


# Tile shapes (moe_kernels.py has its own): the GEMV kernels read [rows, cols] tiles with cols contiguous.
# The fastest of a sweep on an H100 at the real model's dims, each kernel timed inside a CUDA graph with
# its weights out of L2 (benchmarks/kernel_speed.py); valid for any size.
GEMV_BLOCKS = dict(BLOCK_N=2, num_warps=8, PER_SM=0)  # whole rows: BLOCK_K is the vector's length; PER_SM:
# programs per SM, each looping over tiles (0: a program per tile; looping is swept, not yet measured)
# GQA-packed tensor-core tiles (tile sizes not swept); ONE_RANGE: caches up to this many positions are one range
ATTENTION_BLOCKS = dict(BLOCK_S=64, num_warps=4, ONE_RANGE=256, LONG_RANGE=256)
MERGE_BLOCKS = dict(num_warps=4)  # a head's [splits, D] partials: a few thousand floats
# The one-program kernels (norm, route) and the per-head one: a vector of a few thousand elements,
# whose reductions within one warp are shuffles, with no shared memory and no barrier.
SMALL_BLOCKS = dict(num_warps=1)
ROWS_BLOCKS = dict(num_warps=4)  # a prompt's rows, a program each: a 2048-wide row over 128 threads

# Programmatic dependent launch (Hopper and later): each kernel is launched while the one before it
# finishes, reads its weights, and waits (_wait_for_inputs) only for the inputs that kernel writes.
PDL = True
_pdl_devices: dict[torch.device, bool] = {}


def _launch(device: torch.device) -> dict:
    """The PDL constexpr and launch option for kernels on `device` (off under the interpreter)."""
    if interpreted() or device.type != "cuda" or not PDL:
        return {"PDL": False}
    if device not in _pdl_devices:
        _pdl_devices[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if _pdl_devices[device] else {"PDL": False}


def _small() -> dict:
    return {} if interpreted() else SMALL_BLOCKS


def _blocks(tuned: dict, **dims: int) -> dict:
    """Tile sizes no larger than the matrix; under Triton's interpreter, which pays per program and per
    operation rather than per element, one tile covers the whole dimension."""
    if interpreted():
        return {k: triton.next_power_of_2(n) for k, n in dims.items()}
    return {"num_warps": tuned["num_warps"], **{k: min(tuned[k], triton.next_power_of_2(n)) for k, n in dims.items()}}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """RMSNorm(x + delta) * weight over the last dimension (x contiguous: one row when decoding, a prompt's
    tokens in prefill). Returns (normed, x + delta) (the new residual stream) when delta is given, else
    normed."""
    n = weight.numel()
    rows = x.numel() // n
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if delta is not None else out
    warps = _small() if rows == 1 or interpreted() else ROWS_BLOCKS
    _rms_norm_kernel[(rows,)](x, delta if delta is not None else x, weight, out, summed, n, eps,
                              HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n), **warps,
                              **_launch(x.device))
    return (out, summed) if delta is not None else out


def attention(qkv: torch.Tensor, q_norm, k_norm, cos, sin, pos, k_cache, v_cache, mask, n_heads: int, n_kv: int,
              eps: float, scale: float, splits: int | None = None) -> torch.Tensor:
    """One token of batch row 0 from its QKV product qkv [(n_heads + 2 n_kv) * D]: per-head RMSNorm of q
    and k, RoPE, k and v written into row 0 of the caches [B, n_kv, S, D] at position pos[0], and
    softmax(q k^T * scale) v over positions 0..pos[0] where mask [S] is True (the token always sees
    itself), the cache split in `splits` ranges (None: enough to fill the GPU), each range's partial
    softmax then merged by a second kernel. Returns [n_heads * D]."""
    d, seq, dev = q_norm.numel(), k_cache.shape[2], qkv.device
    block_s, splits = _kv_splits(seq, n_kv, dev, splits)
    chunk = triton.cdiv(triton.cdiv(seq, splits), block_s) * block_s
    splits = triton.cdiv(seq, chunk)
    out = torch.empty(n_heads * d, dtype=qkv.dtype, device=dev)
    part = torch.empty(n_heads * splits * d, dtype=torch.float32, device=dev) if splits > 1 else out
    stats = torch.empty(n_heads * splits * 2, dtype=torch.float32, device=dev) if splits > 1 else out
    interpret = interpreted()
    warps = {} if interpret else {"num_warps": ATTENTION_BLOCKS["num_warps"]}
    group = n_heads // n_kv
    _attention_kernel[(n_kv, splits)](qkv, q_norm, k_norm, cos, sin, pos, k_cache, v_cache, mask.view(torch.uint8), out,
                                      part, stats, n_heads, n_kv, k_cache.stride(1), chunk, splits, eps, scale,
                                      GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, HALF=d // 2,
                                      BLOCK_HALF=max(16, triton.next_power_of_2(d // 2)), BLOCK_S=block_s,
                                      SPLIT=splits > 1, IEEE=qkv.dtype == torch.float32 or interpret, **warps,
                                      **_launch(dev))
    if splits > 1:
        _merge_splits_kernel[(n_heads,)](part, stats, out, splits, D=d, BLOCK_D=triton.next_power_of_2(d),
                                         BLOCK_SPLITS=triton.next_power_of_2(splits),
                                         **({} if interpret else MERGE_BLOCKS), **_launch(dev))
    return out


_sm_count: dict[torch.device, int] = {}


def _sms(device: torch.device) -> int:
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_count[device]


def _kv_splits(seq: int, n_kv: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(positions per tile, ranges of the cache), each range at least a tile.
    Under the interpreter, two ranges (what tests exercise) of one tile each (16 positions at least: a
    tensor-core product's smallest side)."""
    if interpreted():
        block = max(16, triton.next_power_of_2(triton.cdiv(seq, splits or 2)))
        return block, splits or triton.cdiv(seq, block)
    block = max(16, min(ATTENTION_BLOCKS["BLOCK_S"], triton.next_power_of_2(seq)))
    if splits is None:
        # Measured on an H100 (benchmarks/results/context_sweep_h100_*, attention_splits_h100_*): one range
        # for a short cache; else about two programs per SM, each range a tile at least (a program per SM:
        # slower from 2k to 32k positions); once those ranges pass LONG_RANGE positions, ranges of
        # LONG_RANGE, up to four programs per SM (32k positions, 4 KV heads: 40 against 46 us)
        sms, long_ranges = _sms(device), triton.cdiv(seq, ATTENTION_BLOCKS["LONG_RANGE"])
        splits = 1 if seq <= ATTENTION_BLOCKS["ONE_RANGE"] else max(
            triton.cdiv(2 * sms, n_kv), min(triton.cdiv(4 * sms, n_kv), long_ranges))
    return block, max(1, min(splits, triton.cdiv(seq, block)))


_counter_buffers: dict[tuple[torch.device, str], torch.Tensor] = {}


def _counters(device: torch.device, kernel: str, n: int) -> torch.Tensor:
    """Zeroed int32 counters for `kernel`'s last-program-merges pattern, which leaves them zeroed: shared by
    every call on the device (calls on one stream run one after another, and each kernel touches its
    counters only after waiting for the kernel before it). Grown on first use, which is a warm-up before
    any CUDA graph is captured."""
    c = _counter_buffers.get((device, kernel))
    if c is None or c.numel() < n:
        c = _counter_buffers[(device, kernel)] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def _gemv(x, w, norm=None, eps=0.0, delta=None):
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    normed = torch.empty_like(x) if norm is not None else out
    summed = torch.empty_like(x) if delta is not None else normed
    b = _blocks(GEMV_BLOCKS, BLOCK_N=n)
    tiles = triton.cdiv(n, b["BLOCK_N"])
    per_sm = GEMV_BLOCKS.get("PER_SM", 0)
    programs = min(tiles, per_sm * _sms(x.device)) if per_sm else tiles
    _gemv_kernel[(programs,)](x, x if delta is None else delta, w if norm is None else norm, w, summed, normed, out,
                              n, programs, eps, K=k, NORM=norm is not None, HAS_DELTA=delta is not None,
                              BLOCK_K=triton.next_power_of_2(k), LOOP=programs < tiles, **b, **_launch(x.device))
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
