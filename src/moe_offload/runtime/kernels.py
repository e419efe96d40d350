"""Fused Triton kernels for decoding one token on a GPU (batch 1): the hot path's small steps in a few launches.

A decoded token is memory-bound: every weight it touches is read once. What makes it slow is everything
else: dozens of tiny kernels per layer (norms, RoPE, routing, casts) and, for the experts, copying the k
routed experts' weights out of the cache's slabs before multiplying (`w1[slots]` reads and writes them
again). These kernels read the routed experts' slots in place and fold the small steps together:

  rms_norm / add_rms_norm   the residual add and RMSNorm of a layer in one pass
  attention                 from the fused QKV output: per-head RMSNorm of q and k, RoPE, the K/V cache
                            write, and one query over the cache up to its position, GQA heads read in place
  linear, norm_linear       a one-token GEMV, optionally after the (residual add and) RMSNorm feeding it
  route                     softmax, top-k, renormalisation and the slot lookup (expert -> slab slot); with
                            the cache's LRU on the device, slots for the absent experts too
  moe_gate_up, moe_down     the k experts' SwiGLU straight from the slabs, weighted and added to the residual;
                            an absent expert read from pinned host RAM in place and written into its slot

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
    def _route_kernel(logits_ptr, table_ptr, top_i_ptr, top_w_ptr, slots_ptr, record_ptr, owner_ptr, stamp_ptr,
                      clock_ptr, host_off_ptr, src_ptr, n_experts, n_slots, K: tl.constexpr, NORM: tl.constexpr,
                      RECORD: tl.constexpr, POLICY: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
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
        if POLICY:
            # The layer's LRU, kept on the device, touching the step's experts as the host's LRU does
            # (ascending: step_accesses): an absent one takes the least recently used slot (whose expert
            # may be one of this step's not yet touched, which then misses too); the expert kernels read
            # each absent one from the host tier in place and write it into its slot. No host round
            # trip, so the step stays one graph.
            s_offs = tl.arange(0, BLOCK_S)
            s_mask = s_offs < n_slots
            stamps = tl.load(stamp_ptr + s_offs, mask=s_mask, other=1 << 62)
            owners = tl.load(owner_ptr + s_offs, mask=s_mask, other=-1)
            slots = tl.where(kmask, slots, -1)
            first = slots
            rank = tl.sum(((chosen_i[None, :] < chosen_i[:, None]) & kmask[None, :]).to(tl.int64), axis=1)
            evicted = tl.full([BLOCK_K], -1, tl.int64)  # per expert: the one its admission evicted
            now = tl.load(clock_ptr) * K
            for r in tl.static_range(K):
                sel = (rank == r) & kmask
                expert = tl.sum(tl.where(sel, chosen_i, 0), axis=0)
                slot = tl.sum(tl.where(sel, slots, 0), axis=0)
                absent = slot < 0
                oldest = tl.min(stamps, axis=0)
                victim = tl.min(tl.where(stamps == oldest, s_offs, BLOCK_S), axis=0).to(tl.int64)  # ties: lowest
                slot = tl.where(absent, victim, slot)
                gone = tl.where(absent, tl.sum(tl.where(s_offs == slot, owners, 0), axis=0), -1)
                slots = tl.where(chosen_i == gone, -1, slots)  # a later expert of this step lost its slot
                slots = tl.where(sel, slot, slots)
                evicted = tl.where(sel, gone, evicted)
                owners = tl.where(s_offs == slot, expert, owners)
                stamps = tl.where(s_offs == slot, now + r, stamps)
            miss = kmask & ((first < 0) | (first != slots))
            readmitted = tl.sum(((evicted[:, None] == chosen_i[None, :]) & kmask[None, :]).to(tl.int32), axis=1) > 0
            tl.store(table_ptr + evicted, tl.full([BLOCK_K], -1, tl.int64), mask=kmask & (evicted >= 0) & ~readmitted)
            tl.store(table_ptr + chosen_i, slots, mask=kmask)
            tl.store(owner_ptr + s_offs, owners, mask=s_mask)
            tl.store(stamp_ptr + s_offs, stamps, mask=s_mask)
            tl.store(src_ptr + ks, tl.load(host_off_ptr + chosen_i, mask=miss, other=-1), mask=kmask)
            if RECORD:  # 0: hit, 1: miss into a free slot, 2: miss that evicted
                tl.store(record_ptr + 2 * K + ks, tl.where(miss, tl.where(evicted >= 0, 2.0, 1.0), 0.0), mask=kmask)
        # an absent expert (slot -1) reads slot 0 instead: the step is redone once the host sees the miss
        tl.store(slots_ptr + ks, tl.maximum(slots, 0), mask=kmask)

    @triton.jit
    def _read_through(slot_ptr, host_ptr, offs, mask, from_host):
        """A tile of an expert's weights: from its slot, or (from_host) from the host tier, cast to the
        slot's dtype as a load into the slot casts, and stored into the slot on the way."""
        w_host = tl.load(host_ptr + offs, mask=mask & from_host, other=0.0).to(slot_ptr.dtype.element_ty)
        tl.store(slot_ptr + offs, w_host, mask=mask & from_host)
        w_slot = tl.load(slot_ptr + offs, mask=mask & (from_host == 0), other=0.0)
        return tl.where(from_host, w_host, w_slot)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w1_ptr, slots_ptr, act_ptr, host_ptr, src_ptr, slot_stride, H: tl.constexpr,
                            I: tl.constexpr, HOST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
                            PDL: tl.constexpr):
        _wait_for_inputs(PDL)  # the slots come from the route kernel, just before
        e = tl.program_id(0)  # which of the token's k experts
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_mask = rows < I
        base = w1_ptr + tl.load(slots_ptr + e) * slot_stride
        if HOST:  # an expert absent from the slots is read from the host tier in place and written through
            src = tl.load(src_ptr + e)
            host_base = host_ptr + tl.multiple_of(tl.maximum(src, 0), 16)
        gate = tl.zeros([BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_I], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            m = row_mask[:, None] & col_mask[None, :]
            g_off, u_off = rows[:, None] * H + cols[None, :], (rows[:, None] + I) * H + cols[None, :]
            if HOST:
                wg = _read_through(base, host_base, g_off, m, src >= 0)
                wu = _read_through(base, host_base, u_off, m, src >= 0)
            else:
                wg = tl.load(base + g_off, mask=m, other=0.0)
                wu = tl.load(base + u_off, mask=m, other=0.0)
            gate += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
            up += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
        dt = act_ptr.dtype.element_ty
        gate = gate.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(act_ptr + e * I + rows, (silu * up).to(dt), mask=row_mask)

    @triton.jit
    def _moe_down_kernel(act_ptr, w2_ptr, slots_ptr, weights_ptr, resid_ptr, out_ptr, host_ptr, src_ptr, part_ptr,
                         count_ptr, slot_stride, K: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
                         HAS_RESID: tl.constexpr, HOST: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
                         PDL: tl.constexpr):
        # One program per (row block, expert), so all k experts' reads are in flight at once; the last
        # program of a row block to finish adds the k products up, in expert order as transformers does
        # (an atomic counter per row block; no atomics on the values, so the rounding is the same).
        block = tl.program_id(0)
        e = tl.program_id(1)
        rows = block * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = rows < H
        cols = tl.arange(0, BLOCK_I)  # whole rows
        col_mask = cols < I
        m = row_mask[:, None] & col_mask[None, :]
        dt = out_ptr.dtype.element_ty
        # The weights before the wait: the slots (and src) come from the route kernel, two launches back
        base = w2_ptr + tl.load(slots_ptr + e) * slot_stride
        if HOST:  # as in the gate/up kernel; down follows gate and up in the host tier (2I x H elements)
            src = tl.load(src_ptr + e)
            host_base = host_ptr + tl.multiple_of(tl.maximum(src, 0) + 2 * I * H, 16)
            w = _read_through(base, host_base, rows[:, None] * I + cols[None, :], m, src >= 0)
        else:
            w = tl.load(base + rows[:, None] * I + cols[None, :], mask=m, other=0.0)
        _wait_for_inputs(PDL)
        a = tl.load(act_ptr + e * I + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        tl.store(part_ptr + e * H + rows, y.to(dt), mask=row_mask)
        tl.debug_barrier()  # every thread's part stored before the release below publishes it
        if tl.atomic_add(count_ptr + block, 1, sem="acq_rel") == K - 1:
            total = tl.zeros([BLOCK_H], dtype=tl.float32)
            for j in tl.static_range(K):  # .cg: from L2, where the other programs' stores are
                yj = tl.load(part_ptr + j * H + rows, mask=row_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                total += (yj * tl.load(weights_ptr + j).to(tl.float32)).to(dt).to(tl.float32)
            total = total.to(dt)
            if HAS_RESID:
                total = (tl.load(resid_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
                         + total.to(tl.float32)).to(dt)
            tl.store(out_ptr + rows, total, mask=row_mask)
            tl.atomic_xchg(count_ptr + block, 0)  # ready for the next launch (graph replays reuse the counters)

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


# Tile shapes: the GEMV kernels read [rows, cols] tiles with cols contiguous. The fastest of a sweep on an
# H100 at the real model's dims, each kernel timed inside a CUDA graph with its weights out of L2
# (benchmarks/kernel_speed.py); valid for any size.
GATE_UP_BLOCKS = dict(BLOCK_I=2, BLOCK_H=2048, num_warps=8)
DOWN_BLOCKS = dict(BLOCK_H=4, num_warps=2)  # whole rows: BLOCK_I is the intermediate size
GEMV_BLOCKS = dict(BLOCK_N=2, num_warps=8)  # whole rows: BLOCK_K is the vector's length
ATTENTION_BLOCKS = dict(BLOCK_S=128, num_warps=8)
# The one-program kernels (norm, route) and the per-head one: a vector of a few thousand elements,
# whose reductions within one warp are shuffles, with no shared memory and no barrier.
SMALL_BLOCKS = dict(num_warps=1)

_counters: dict[torch.device, torch.Tensor] = {}


def _row_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per row block of the down kernel, which leaves them zeroed: shared by
    every call on the device (calls on one stream run one after another). Grown on first use, which is a
    warm-up before any CUDA graph is captured."""
    c = _counters.get(device)
    if c is None or c.numel() < n:
        c = _counters[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


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


def route(logits: torch.Tensor, table: torch.Tensor, k: int, norm_topk_prob: bool, record: torch.Tensor | None = None,
          policy=None):
    """Router logits [E] of one token -> (top_i [k], top_w [k] in the logits' dtype, slots [k], src);
    also written as float32 into record [2, k] when given. policy: None, or the layer's LRU on the device
    (owner [S], stamp [S], clock [1], host offsets [E]; see DevicePolicy): absent experts then get slots
    at once, src [k] is where to read each in the host tier (-1: in its slot), and record [3, k] also
    holds each expert's outcome (0 hit, 1 miss, 2 miss that evicted)."""
    e = logits.numel()
    dev = logits.device
    top_i = torch.empty(k, dtype=torch.long, device=dev)
    top_w = torch.empty(k, dtype=logits.dtype, device=dev)
    slots = torch.empty(k, dtype=torch.long, device=dev)
    src = torch.empty(k, dtype=torch.long, device=dev) if policy is not None else None
    owner, stamp, clock, host_off = policy if policy is not None else (slots,) * 4
    _route_kernel[(1,)](logits, table, top_i, top_w, slots, top_w if record is None else record, owner, stamp, clock,
                        host_off, slots if src is None else src, e, owner.numel(), K=k, NORM=norm_topk_prob,
                        RECORD=record is not None, POLICY=policy is not None, BLOCK_E=triton.next_power_of_2(e),
                        BLOCK_K=triton.next_power_of_2(k), BLOCK_S=triton.next_power_of_2(owner.numel()), **_small(),
                        **_launch(dev))
    return top_i, top_w, slots, src


def moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
        resid: torch.Tensor | None = None, host: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[resid +] sum_j weights[j] * down_j(silu(gate_j x) * up_j x) for one token, the experts read in place
    from the slabs w1 [S, 2I, H] and w2 [S, H, I] at `slots`. host: (the layer's host tier as elements,
    src [k]): expert j with src[j] >= 0 is read there instead (gate, up, down back to back from element
    src[j]) and written into its slot as it is read."""
    k, (_, two_i, h) = slots.numel(), w1.shape
    i = two_i // 2
    host_buf, src = host if host is not None else (w1, slots)
    act = torch.empty(k, i, dtype=x.dtype, device=x.device)
    gu = _blocks(GATE_UP_BLOCKS, BLOCK_I=i, BLOCK_H=h)
    _moe_gate_up_kernel[(k, triton.cdiv(i, gu["BLOCK_I"]))](x, w1, slots, act, host_buf, src, w1.stride(0), H=h, I=i,
                                                            HOST=host is not None, **gu, **_launch(x.device))
    out = torch.empty_like(x)
    dn = _blocks(DOWN_BLOCKS, BLOCK_H=h)
    n_blocks = triton.cdiv(h, dn["BLOCK_H"])
    part = torch.empty(k, h, dtype=x.dtype, device=x.device)
    _moe_down_kernel[(n_blocks, k)](act, w2, slots, weights, x if resid is None else resid, out, host_buf, src, part,
                                    _row_counters(x.device, n_blocks), w2.stride(0), K=k, H=h, I=i,
                                    HAS_RESID=resid is not None, HOST=host is not None,
                                    BLOCK_I=triton.next_power_of_2(i), **dn, **_launch(x.device))
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
