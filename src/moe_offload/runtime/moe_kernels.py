"""The MoE layer's Triton kernels for one decoded token: routing (with the cache's LRU on the device when
misses are read in place) and the k routed experts read in place from the cache's slabs.

  route                     softmax, top-k, renormalisation and the slot lookup (expert -> slab slot); with
                            the cache's LRU on the device, slots for the absent experts too
  moe_gate_up, moe_down     the k experts' SwiGLU straight from the slabs (no `w1[slots]` copies), weighted
                            and added to the residual; an absent expert read from pinned host RAM in place
                            and written into its slot; int8 or int4 experts dequantized in registers,
                            a group at a time (no 16-bit copy of them is ever made); int4 steps that read
                            from the host tier on tensor cores, wide rows a step (_nibble_products)

They round as transformers rounds (the routing weights, each expert's product) and run where kernels.py's
do, under the same programmatic dependent launch.
"""

from __future__ import annotations

import torch

from .kernels import _blocks, _counters, _launch, _small, interpreted, triton

if triton is not None:
    import triton.language as tl

    from .kernels import _wait_for_inputs

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
    def _exact_float(v):
        """float32(v) for int32 |v| < 2**22, with no conversion instruction: v added to the bits of 1.5 * 2**23
        lands in its mantissa, and 1.5 * 2**23 taken away leaves v exactly. An integer add and a float
        subtract run at full rate, a conversion (I2F) at a fraction of it; on an H100 the int4 decode step
        gained 2.5% and the int8 prompt GEMM 9% (so conversions were not what bounds int4 decode)."""
        return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0

    @triton.jit
    def _read_through(slot_ptr, host_ptr, offs, mask, from_host):
        """A tile of an expert's weights: from its slot, or (from_host) from the host tier, cast to the
        slot's dtype as a load into the slot casts, and stored into the slot on the way."""
        w_host = tl.load(host_ptr + offs, mask=mask & from_host, other=0).to(slot_ptr.dtype.element_ty)
        tl.store(slot_ptr + offs, w_host, mask=mask & from_host)
        w_slot = tl.load(slot_ptr + offs, mask=mask & (from_host == 0), other=0)
        return tl.where(from_host, w_host, w_slot)

    @triton.jit
    def _quant_load(w_ptr, s_ptr, rows, row_mask, g0, N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, hw_ptr, hs_ptr, from_host, HOST: tl.constexpr):
        """Rows `rows` of a quantized weight [rows, N] (checkpoint.quantize's form) over groups g0 .. g0 +
        BLOCK_G, as stored: (bytes [rows, groups, BLOCK_J] (a group's GROUP * BITS / 8 bytes, padded to
        BLOCK_J), scales [rows, groups] in float32). Tiles are whole groups, so each scale multiplies one
        group's sum, not each weight. HOST: where from_host, read from the host tier (hw_ptr, hs_ptr: the
        same weight as stored there) and written into the slot on the way."""
        BYTES: tl.constexpr = GROUP * BITS // 8  # per group
        groups = g0 + tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_J)
        m = row_mask[:, None] & (groups < N // GROUP)[None, :]
        cols = groups[:, None] * BYTES + j[None, :]
        q_offs = rows[:, None, None] * (N * BITS // 8) + cols[None, :, :]
        q_mask = m[:, :, None] & (j < BYTES)[None, None, :]
        s_offs = rows[:, None] * (N // GROUP) + groups[None, :]
        if HOST:
            q = _read_through(w_ptr, hw_ptr, q_offs, q_mask, from_host)
            s = _read_through(s_ptr, hs_ptr, s_offs, m, from_host)
        else:
            q = tl.load(w_ptr + q_offs, mask=q_mask, other=0)
            s = tl.load(s_ptr + s_offs, mask=m, other=0.0)
        return q, s.to(tl.float32)

    @triton.jit
    def _gate_up_tiles(w_ptr, s_ptr, rows, row_mask, g0, H: tl.constexpr, I: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr, hw_ptr, hs_ptr, from_host,
                       HOST: tl.constexpr):
        """_quant_load's tiles of gate's rows `rows` and of up's (I rows below them): (qg, sg, qu, su)."""
        qg, sg = _quant_load(w_ptr, s_ptr, rows, row_mask, g0, H, BITS, GROUP, BLOCK_G, BLOCK_J, hw_ptr, hs_ptr,
                             from_host, HOST)
        qu, su = _quant_load(w_ptr, s_ptr, rows + I, row_mask, g0, H, BITS, GROUP, BLOCK_G, BLOCK_J, hw_ptr, hs_ptr,
                             from_host, HOST)
        return qg, sg, qu, su

    @triton.jit
    def _quant_dot(q, s, x_ptr, g0, N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_J: tl.constexpr):
        """_quant_load's tile times x [N] -> [rows] in float32: w = q * scale, each group's products summed
        in float32 and then scaled (w is never rounded to the compute dtype, as torch's 16-bit copy is)."""
        BYTES: tl.constexpr = GROUP * BITS // 8
        groups = g0 + tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_J)
        m = (groups < N // GROUP)[:, None] & (j < BYTES)[None, :]
        cols = groups[:, None] * BYTES + j[None, :]
        if BITS == 8:
            x = tl.load(x_ptr + cols, mask=m, other=0.0).to(tl.float32)
            part = tl.sum(_exact_float(q.to(tl.int32)) * x[None, :, :], axis=2)
        else:  # a byte holds input columns 2c (low nibble) and 2c + 1 (high), each as q + 8
            x_even = tl.load(x_ptr + 2 * cols, mask=m, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + 2 * cols + 1, mask=m, other=0.0).to(tl.float32)
            b = q.to(tl.int32)
            part = tl.sum(_exact_float((b & 15) - 8) * x_even[None, :, :]
                          + _exact_float((b >> 4) - 8) * x_odd[None, :, :], axis=2)
        return tl.sum(part * s, axis=1)

    @triton.jit
    def _nibble_products(w_base, s_base, rows, row_mask, v_ptr, N_IN: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_R: tl.constexpr, KC: tl.constexpr, NG: tl.constexpr, BLOCK_GROUP: tl.constexpr,
                         STAGES: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr, hw_ptr, hs_ptr, from_host):
        """Rows `rows` of an int4 weight [rows, N_IN] (two to a byte, each as q + 8; float16 scales
        [rows, N_IN / GROUP]) times v [N_IN] -> [BLOCK_R] in float32, read through from the host tier where
        from_host (as _quant_load), on tensor cores. Wide rows a step (KC input columns), the loads
        pipelined (STAGES) and each row's scales read once: on an H100 a step whose experts all come from
        the host tier reads at 0.97 of the zero-copy rate, against 0.82 with _quant_load's tiles of a few
        groups (resident, those are faster: 19 against 30 us a step). v is laid out block-diagonally
        (column g of the product's [KC, NG] operand holds group g's entries), so one product gives every
        group's sum of q * v for all rows, and each sum takes its scale at the end. The low nibbles are the
        even input columns, the high the odd: two products a step, no interleaving. BIAS (16-bit v):
        nibble n becomes the bfloat16 128 + n by its bits (0x4300 | n, exact, no conversion), so the
        products are of q + 136, and 136 times each group's sum of v is taken off after; else q exactly,
        in float32."""
        ROW_BYTES: tl.constexpr = N_IN // 2
        G: tl.constexpr = N_IN // GROUP
        b = tl.arange(0, KC // 2)
        ng = tl.arange(0, NG)
        tdt = tl.float32 if IEEE else tl.bfloat16
        acc = tl.zeros([BLOCK_R, NG], dtype=tl.float32)
        for c0 in tl.range(0, ROW_BYTES, KC // 2, num_stages=STAGES):
            byte = c0 + b
            inside = byte < ROW_BYTES
            offs = rows[:, None] * ROW_BYTES + byte[None, :]
            m = row_mask[:, None] & inside[None, :]
            q = _read_through(w_base, hw_ptr, offs, m, from_host)
            if BIAS:
                lo = ((q & 15).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True).to(tdt)
                hi = ((q >> 4).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True).to(tdt)
            else:
                lo = _exact_float((q & 15).to(tl.int32) - 8).to(tdt)
                hi = _exact_float((q >> 4).to(tl.int32) - 8).to(tdt)
            here = ((2 * byte // GROUP)[:, None] == ng[None, :]) & inside[:, None]  # GROUP even: 2c + 1 in 2c's
            v_even = tl.load(v_ptr + 2 * byte, mask=inside, other=0.0)
            v_odd = tl.load(v_ptr + 2 * byte + 1, mask=inside, other=0.0)
            precision: tl.constexpr = "ieee" if IEEE else "tf32"
            acc = tl.dot(lo, tl.where(here, v_even[:, None], 0.0).to(tdt), acc, input_precision=precision)
            acc = tl.dot(hi, tl.where(here, v_odd[:, None], 0.0).to(tdt), acc, input_precision=precision)
        gmask = ng < G
        s_offs = rows[:, None] * G + ng[None, :]
        sm = row_mask[:, None] & gmask[None, :]
        s = _read_through(s_base, hs_ptr, s_offs, sm, from_host)
        if BIAS:
            j = tl.arange(0, BLOCK_GROUP)
            v = tl.load(v_ptr + ng[:, None] * GROUP + j[None, :], mask=gmask[:, None] & (j < GROUP)[None, :], other=0.0)
            acc -= 136.0 * tl.sum(v.to(tl.float32), axis=1)[None, :]
        return tl.sum(acc * s.to(tl.float32), axis=1)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w1_ptr, s1_ptr, slots_ptr, act_ptr, host_ptr, host_s_ptr, src_ptr, slot_stride,
                            scale_stride,
                            H: tl.constexpr, I: tl.constexpr, HOST: tl.constexpr, BITS: tl.constexpr,
                            GROUP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_J: tl.constexpr, PDL: tl.constexpr, KC: tl.constexpr = 1, NG: tl.constexpr = 1,
                            BLOCK_GROUP: tl.constexpr = 1, STAGES: tl.constexpr = 1, BIAS: tl.constexpr = False,
                            IEEE: tl.constexpr = False, PREFETCH: tl.constexpr = False):
        # BITS 16: w1 in the compute dtype, tiles of BLOCK_H columns; 8 or 4: w1 quantized (s1 its scales),
        # tiles of BLOCK_G groups of GROUP columns, dequantized in registers; 4 from the host tier (HOST):
        # _nibble_products' tiles (KC .. IEEE)
        _wait_for_inputs(PDL)  # the slots come from the route kernel, just before
        e = tl.program_id(0)  # which of the token's k experts
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_mask = rows < I
        slot = tl.load(slots_ptr + e)
        base = w1_ptr + slot * slot_stride
        gate = tl.zeros([BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_I], dtype=tl.float32)
        if BITS == 16:
            if HOST:  # an expert absent from the slots is read from the host tier in place and written through
                src = tl.load(src_ptr + e)
                host_base = host_ptr + tl.multiple_of(tl.maximum(src, 0), 16)
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
        else:
            s_base = s1_ptr + slot * scale_stride
            # in the host tier an expert is its qweights (gate, up, down) then its float16 scales, from byte src
            host_q, host_s, from_host = base, s_base, False
            if HOST:
                src = tl.load(src_ptr + e)
                host_q = host_ptr + tl.maximum(src, 0)
                host_s = host_s_ptr + (tl.maximum(src, 0) + 3 * I * H * BITS // 8) // 2
                from_host = src >= 0
            if BITS == 4 and HOST:
                gate = _nibble_products(base, s_base, rows, row_mask, x_ptr, H, GROUP, BLOCK_I, KC, NG, BLOCK_GROUP,
                                        STAGES, BIAS, IEEE, host_q, host_s, from_host)
                up = _nibble_products(base, s_base, rows + I, row_mask, x_ptr, H, GROUP, BLOCK_I, KC, NG,
                                      BLOCK_GROUP, STAGES, BIAS, IEEE, host_q, host_s, from_host)
            else:
                if PREFETCH:  # each tile's bytes read a step ahead, while the one before is summed (registers)
                    ahead = _gate_up_tiles(base, s_base, rows, row_mask, 0, H, I, BITS, GROUP, BLOCK_G, BLOCK_J,
                                           host_q, host_s, from_host, HOST)
                for g0 in range(0, H // GROUP, BLOCK_G):
                    if PREFETCH:
                        qg, sg, qu, su = ahead
                        ahead = _gate_up_tiles(base, s_base, rows, row_mask, g0 + BLOCK_G, H, I, BITS, GROUP, BLOCK_G,
                                               BLOCK_J, host_q, host_s, from_host, HOST)
                    else:
                        qg, sg, qu, su = _gate_up_tiles(base, s_base, rows, row_mask, g0, H, I, BITS, GROUP, BLOCK_G,
                                                        BLOCK_J, host_q, host_s, from_host, HOST)
                    gate += _quant_dot(qg, sg, x_ptr, g0, H, BITS, GROUP, BLOCK_G, BLOCK_J)
                    up += _quant_dot(qu, su, x_ptr, g0, H, BITS, GROUP, BLOCK_G, BLOCK_J)
        dt = act_ptr.dtype.element_ty
        gate = gate.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(act_ptr + e * I + rows, (silu * up).to(dt), mask=row_mask)

    @triton.jit
    def _moe_down_kernel(act_ptr, w2_ptr, s2_ptr, slots_ptr, weights_ptr, resid_ptr, out_ptr, host_ptr, host_s_ptr,
                         src_ptr, part_ptr, count_ptr, slot_stride, scale_stride, K: tl.constexpr, H: tl.constexpr,
                         I: tl.constexpr, HAS_RESID: tl.constexpr, HOST: tl.constexpr, BITS: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_J: tl.constexpr, PDL: tl.constexpr, KC: tl.constexpr = 1, NG: tl.constexpr = 1,
                         BLOCK_GROUP: tl.constexpr = 1, STAGES: tl.constexpr = 1, BIAS: tl.constexpr = False,
                         IEEE: tl.constexpr = False):
        # One program per (row block, expert), so all k experts' reads are in flight at once; the last
        # program of a row block to finish adds the k products up, in expert order as transformers does
        # (an atomic counter per row block; no atomics on the values, so the rounding is the same).
        # BITS 8 or 4: w2 quantized (s2 its scales), whole rows of BLOCK_G groups.
        block = tl.program_id(0)
        e = tl.program_id(1)
        rows = block * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = rows < H
        cols = tl.arange(0, BLOCK_I)  # whole rows
        col_mask = cols < I
        m = row_mask[:, None] & col_mask[None, :]
        dt = out_ptr.dtype.element_ty
        # The weights before the wait: the slots (and src) come from the route kernel, two launches back
        slot = tl.load(slots_ptr + e)
        base = w2_ptr + slot * slot_stride
        if BITS == 16:
            if HOST:  # as in the gate/up kernel; down follows gate and up in the host tier (2I x H elements)
                src = tl.load(src_ptr + e)
                host_base = host_ptr + tl.multiple_of(tl.maximum(src, 0) + 2 * I * H, 16)
                w = _read_through(base, host_base, rows[:, None] * I + cols[None, :], m, src >= 0)
            else:
                w = tl.load(base + rows[:, None] * I + cols[None, :], mask=m, other=0.0)
            _wait_for_inputs(PDL)
            a = tl.load(act_ptr + e * I + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        else:  # host tier: down's qweights after gate's and up's, its scales after theirs
            s_base = s2_ptr + slot * scale_stride
            host_q, host_s, from_host = base, s_base, False
            if HOST:
                src = tl.load(src_ptr + e)
                host_q = host_ptr + tl.maximum(src, 0) + 2 * I * H * BITS // 8
                host_s = host_s_ptr + (tl.maximum(src, 0) + 3 * I * H * BITS // 8) // 2 + 2 * I * (H // GROUP)
                from_host = src >= 0
            if BITS == 4 and HOST:  # a loop over the row's columns: the weights are read after the wait
                _wait_for_inputs(PDL)
                y = _nibble_products(base, s_base, rows, row_mask, act_ptr + e * I, I, GROUP, BLOCK_H, KC, NG,
                                     BLOCK_GROUP, STAGES, BIAS, IEEE, host_q, host_s, from_host)
            else:
                q, s = _quant_load(base, s_base, rows, row_mask, 0, I, BITS, GROUP, BLOCK_G, BLOCK_J, host_q, host_s,
                                   from_host, HOST)
                _wait_for_inputs(PDL)
                y = _quant_dot(q, s, act_ptr + e * I, 0, I, BITS, GROUP, BLOCK_G, BLOCK_J)
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
    def _grouped_quant_kernel(x_ptr, w_ptr, s_ptr, ends_ptr, out_ptr, n_groups, slot_stride, scale_stride,
                              N_IN: tl.constexpr, N_OUT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
        # Program (row tile, column tile): row tile t of the rows sorted by slot belongs to the group (slot)
        # whose cumulative count of row tiles first passes t; tiles past the last group do nothing. Each
        # program counts the tiles itself from the groups' row ends (a few hundred integers): no launches
        # before this one to do it.
        t = tl.program_id(0)
        g_offs = tl.arange(0, BLOCK_S)
        live = g_offs < n_groups
        ends = tl.load(ends_ptr + g_offs, mask=live, other=0)
        starts = tl.load(ends_ptr + g_offs - 1, mask=live & (g_offs > 0), other=0)
        tile_ends = tl.cumsum(tl.where(live, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0), axis=0)
        g = tl.sum((live & (tile_ends <= t)).to(tl.int32), axis=0)
        if g < n_groups:
            first_tile = tl.sum(tl.where(g_offs == g - 1, tile_ends, 0), axis=0)  # 0 for the first group
            row_start = tl.sum(tl.where(g_offs == g - 1, ends, 0), axis=0)
            rows = row_start + (t - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < tl.load(ends_ptr + g)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = n < N_OUT
            w_base = w_ptr + g.to(tl.int64) * slot_stride
            s_base = s_ptr + g.to(tl.int64) * scale_stride
            dt = out_ptr.dtype.element_ty
            tdt = tl.float32 if IEEE else dt  # the interpreter's products: float32 (it has no bf16 dot)
            precision: tl.constexpr = "ieee" if IEEE else "tf32"
            ROW_BYTES: tl.constexpr = N_IN * BITS // 8
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for q0 in range(0, N_IN // GROUP):  # a quantization group a step: one scale per output row
                s = tl.load(s_base + n * (N_IN // GROUP) + q0, mask=n_mask, other=0.0).to(tl.float32)
                for c0 in range(0, GROUP, BLOCK_C):  # BLOCK_C input columns at a time
                    c = c0 + tl.arange(0, BLOCK_C)
                    cols = q0 * GROUP + c
                    c_mask = c < GROUP
                    x = tl.load(x_ptr + rows[:, None] * N_IN + cols[None, :], mask=row_mask[:, None] & c_mask[None, :],
                                other=0.0).to(tdt)
                    if BITS == 8:
                        q = _exact_float(tl.load(w_base + n[:, None] * ROW_BYTES + cols[None, :],
                                                 mask=n_mask[:, None] & c_mask[None, :], other=0).to(tl.int32))
                    else:  # byte j holds columns 2j (low nibble) and 2j + 1 (high), each as q + 8
                        half = c0 // 2 + tl.arange(0, BLOCK_C // 2)
                        b = tl.load(w_base + n[:, None] * ROW_BYTES + (q0 * GROUP // 2 + half)[None, :],
                                    mask=n_mask[:, None] & (half < GROUP // 2)[None, :], other=0).to(tl.int32)
                        # the nibbles side by side in column order (a masked byte reads as -8 twice: x is 0
                        # in those columns, so is the product)
                        q = tl.reshape(tl.join(_exact_float((b & 15) - 8), _exact_float((b >> 4) - 8)),
                                       [BLOCK_N, BLOCK_C])
                    # w = q * scale, rounded to the compute dtype as torch's dequantize rounds
                    w = (q * s[:, None]).to(dt).to(tdt)
                    acc = tl.dot(x, tl.trans(w), acc, input_precision=precision)
            tl.store(out_ptr + rows[:, None] * N_OUT + n[None, :], acc.to(dt),
                     mask=row_mask[:, None] & n_mask[None, :])


# Tile shapes, [rows, cols] with cols contiguous: the fastest of a sweep on an H100 at the real model's
# dims, each kernel timed inside a CUDA graph with its weights out of L2 (benchmarks/kernel_speed.py).
GATE_UP_BLOCKS = dict(BLOCK_I=2, BLOCK_H=2048, num_warps=8)
DOWN_BLOCKS = dict(BLOCK_H=4, num_warps=2)  # whole rows: BLOCK_I is the intermediate size
# Quantized experts, by bits: tiles of whole groups (BLOCK_G of them), swept on an H100 at real dims, group
# 128 (benchmarks/results/kernel_speed_quantized_h100.json; int8 down again in session 9:
# moe_step_quantized_h100_session9_exact_float.json)
# (PREFETCH, off unless set: gate/up reads each tile of groups one step ahead; swept, not yet measured)
QUANT_GATE_UP_BLOCKS = {8: dict(BLOCK_I=1, BLOCK_G=16, num_warps=4), 4: dict(BLOCK_I=8, BLOCK_G=4, num_warps=4)}
QUANT_DOWN_BLOCKS = {8: dict(BLOCK_H=64, num_warps=8), 4: dict(BLOCK_H=32, num_warps=2)}  # whole rows
# int4 experts read through from the host tier (_nibble_products): [rows, KC input columns] tiles, the fastest
# of 48 on an H100, a step of 8 experts all from the host tier at real dims, group 128
# (benchmarks/results/int4_host_tiles_h100_session11.json; kernel_speed.py --quantized-only sweeps them again)
HOST_INT4_BLOCKS = dict(gate_up=dict(BLOCK_I=32, KC=256, STAGES=4, num_warps=8),
                        down=dict(BLOCK_H=128, KC=256, STAGES=2, num_warps=8))
# The prompt's grouped GEMM: [rows, output columns] tiles, a quantization group a step; swept on an H100 at
# 2048 tokens x 16 experts (benchmarks/results/quantized_prefill_grouped_h100_session8.json); BLOCK_C: the
# most input columns of a group a step takes
GROUPED_QUANT_BLOCKS = {8: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_C=128, num_warps=8, num_stages=3),
                        4: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_C=128, num_warps=4, num_stages=2)}
# ... and a short prompt's (at most SHORT_ROWS rows a slot on average): 64-row tiles, the fastest of a sweep
# at 36 tokens x 8 over 16 experts (benchmarks/results/quantized_prefill_grouped_h100_session9_short.json)
SHORT_ROWS = 64
GROUPED_QUANT_SHORT_BLOCKS = {bits: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_C=128, num_warps=4, num_stages=2)
                              for bits in (8, 4)}


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


def _nibble_tiles(tuned: dict, rows_key: str, rows: int, n_in: int, group: int, dtype: torch.dtype, **fixed) -> dict:
    """_nibble_products' tiles for a weight [rows, n_in] at `group`: at least a tensor-core product's least
    sides (16 rows, 16 bytes of columns, 16 group columns)."""
    b = _blocks(tuned, **{rows_key: rows}, KC=n_in)
    b[rows_key], b["KC"] = max(16, b[rows_key]), max(32, b["KC"])
    return dict(b, **fixed, BLOCK_G=1, BLOCK_J=1, NG=max(16, triton.next_power_of_2(n_in // group)),
                BLOCK_GROUP=triton.next_power_of_2(group), STAGES=1 if interpreted() else tuned["STAGES"],
                BIAS=dtype != torch.float32, IEEE=dtype == torch.float32 or interpreted())


def moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
        resid: torch.Tensor | None = None, host: tuple[torch.Tensor, torch.Tensor] | None = None,
        quant: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """[resid +] sum_j weights[j] * down_j(silu(gate_j x) * up_j x) for one token, the experts read in place
    from the slabs w1 [S, 2I, H] and w2 [S, H, I] at `slots`. host: (the layer's host tier as elements,
    src [k]): expert j with src[j] >= 0 is read there instead (gate, up, down back to back from element
    src[j]) and written into its slot as it is read. quant: (s1, s2, bits, group_size) of quantized slabs
    (w1 [S, 2I, H * bits / 8], w2 [S, H, I * bits / 8]; slots.py), dequantized in registers; their host
    tier is bytes, src[j] the byte where expert j's qweights start, its float16 scales after them (an even
    byte: expert_files.host_offsets)."""
    bits, group = (16, 1) if quant is None else quant[2:]
    s1, s2 = (w1, w2) if quant is None else quant[:2]
    k, two_i, h = slots.numel(), w1.shape[1], w2.shape[1]
    i = two_i // 2
    host_buf, src = host if host is not None else (w1, slots)
    host_scales = host_buf
    if host is not None and bits != 16:  # the same bytes as the slots' qweights, and as float16 scales
        host_buf, host_scales = host_buf.view(w1.dtype), host_buf[:host_buf.numel() // 2 * 2].view(torch.float16)
    act = torch.empty(k, i, dtype=x.dtype, device=x.device)
    if bits == 16:
        gu = dict(_blocks(GATE_UP_BLOCKS, BLOCK_I=i, BLOCK_H=h), BLOCK_G=1, BLOCK_J=1)
        dn = dict(_blocks(DOWN_BLOCKS, BLOCK_H=h), BLOCK_G=1, BLOCK_J=1)
    elif bits == 8 or host is None:  # BLOCK_J: a group's bytes; the down kernel takes whole rows (all I / G groups)
        per_group = triton.next_power_of_2(group * bits // 8)
        gu = dict(_blocks(QUANT_GATE_UP_BLOCKS[bits], BLOCK_I=i, BLOCK_G=h // group), BLOCK_H=1, BLOCK_J=per_group,
                  PREFETCH=QUANT_GATE_UP_BLOCKS[bits].get("PREFETCH", False))
        dn = dict(_blocks(QUANT_DOWN_BLOCKS[bits], BLOCK_H=h), BLOCK_G=triton.next_power_of_2(i // group),
                  BLOCK_J=per_group)
    else:  # int4 read through from the host tier: tensor-core tiles
        gu = _nibble_tiles(HOST_INT4_BLOCKS["gate_up"], "BLOCK_I", i, h, group, x.dtype, BLOCK_H=1)
        dn = _nibble_tiles(HOST_INT4_BLOCKS["down"], "BLOCK_H", h, i, group, x.dtype)
    _moe_gate_up_kernel[(k, triton.cdiv(i, gu["BLOCK_I"]))](x, w1, s1, slots, act, host_buf, host_scales, src,
                                                            w1.stride(0), s1.stride(0), H=h, I=i, HOST=host is not None, BITS=bits,
                                                            GROUP=group, **gu, **_launch(x.device))
    out = torch.empty_like(x)
    n_blocks = triton.cdiv(h, dn["BLOCK_H"])
    part = torch.empty(k, h, dtype=x.dtype, device=x.device)
    _moe_down_kernel[(n_blocks, k)](act, w2, s2, slots, weights, x if resid is None else resid, out, host_buf,
                                    host_scales, src, part, _counters(x.device, "moe_down", n_blocks), w2.stride(0),
                                    s2.stride(0), K=k,
                                    H=h, I=i, HAS_RESID=resid is not None, HOST=host is not None, BITS=bits,
                                    GROUP=group, BLOCK_I=triton.next_power_of_2(i), **dn, **_launch(x.device))
    return out


def grouped_tiles(rows: int, n_groups: int) -> dict[int, dict]:
    """The tile table (by bits) grouped_linear takes for `rows` pairs over `n_groups` slots: a short prompt's
    or a long one's (kernel_speed sweeps the one in use)."""
    return GROUPED_QUANT_SHORT_BLOCKS if rows <= SHORT_ROWS * n_groups else GROUPED_QUANT_BLOCKS


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, quant: tuple[torch.Tensor, int, int]):
    """x [P, N_in] (rows sorted by slot) -> [P, N_out]: row p of slot g's rows (ends [S]: the cumulative row
    count per slot, as torch._grouped_mm's offs) times quantized slab w [S, N_out, N_in * bits / 8]
    (quant: scales [S, N_out, N_in / G], bits, group_size) transposed, dequantized a tile at a time (no
    16-bit copy of the slab). P is ends[-1]."""
    scales, bits, group = quant
    p, n_in = x.shape
    n_groups, n_out = w.shape[0], w.shape[1]
    out = torch.empty(p, n_out, dtype=x.dtype, device=x.device)
    tiles = grouped_tiles(p, n_groups)[bits]
    b = _blocks(tiles, BLOCK_M=p, BLOCK_N=n_out, BLOCK_C=group)  # BLOCK_C: a group's columns a step, or fewer
    b = {k: max(16, v) if k.startswith("BLOCK") else v for k, v in b.items()}  # tl.dot's least tile
    if "num_stages" in tiles and not interpreted():
        b["num_stages"] = tiles["num_stages"]
    grid = (triton.cdiv(p, b["BLOCK_M"]) + n_groups, triton.cdiv(n_out, b["BLOCK_N"]))  # enough for any split
    _grouped_quant_kernel[grid](x.contiguous(), w, scales, ends, out, n_groups, w.stride(0),
                                scales.stride(0), N_IN=n_in, N_OUT=n_out, BITS=bits, GROUP=group,
                                BLOCK_S=triton.next_power_of_2(n_groups),
                                IEEE=x.dtype == torch.float32 or interpreted(), **b)
    return out
