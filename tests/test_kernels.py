"""The fused decode kernels (Triton; here under its interpreter) against the PyTorch path they replace.

References are the model's own PyTorch functions (which the parity tests hold to transformers), on fresh
seeded random inputs, in float32 (equal to rounding) and bfloat16 (within a few units in the last place).
"""

from __future__ import annotations

import pytest
import torch

from moe_offload.checkpoint.quantize import dequantize, pack, quantize
from moe_offload.runtime import kernels, moe_kernels, prefill_kernels, torch_ops
from moe_offload.runtime.model import combine, expert_counts, qkv_heads, rms_norm, rotate_half, silu_mul, swiglu

pytestmark = pytest.mark.skipif(not kernels.available(torch.device("cpu")),
                                reason="needs triton with TRITON_INTERPRET=1 (set in conftest)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 0.07}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def dtype(request):
    torch.manual_seed(0)
    return request.param


def close(got: torch.Tensor, want: torch.Tensor, dtype) -> bool:
    """Equal to TOL relative to the value (at least 1): for bfloat16, a few units in the last place of
    several roundings chained."""
    return bool(((got.float() - want.float()).abs() <= TOL[dtype] * want.float().abs().clamp(min=1)).all())


def small_tiles(monkeypatch, most: int) -> None:
    """The expert kernels' tiles capped at `most` rows and columns: several tiles per dim, masked tails."""
    import triton
    monkeypatch.setattr(moe_kernels, "_blocks",
                        lambda tuned, **dims: {k: min(most, triton.next_power_of_2(n)) for k, n in dims.items()})


def test_add_rms_norm(dtype):
    x, d, w = (torch.randn(96, dtype=dtype) for _ in range(3))
    normed, summed = kernels.rms_norm(x, w, 1e-6, delta=d)
    # the residual sum rounded once to the dtype (Triton's interpreter may round bf16 down, not to nearest)
    assert ((summed.float() - (x + d).float()).abs() <= (x + d).float().abs() * 2 ** -7).all()
    assert (normed.float() - rms_norm(x + d, w, 1e-6).float()).abs().max() <= TOL[dtype]
    assert (kernels.rms_norm(x, w, 1e-6).float() - rms_norm(x, w, 1e-6).float()).abs().max() <= TOL[dtype]


def test_route_matches_softmax_topk_and_looks_up_slots(dtype):
    e, k = 24, 6
    logits = torch.randn(e, dtype=dtype)
    table = torch.randperm(e)
    table[logits.float().argmax()] = -1  # the top expert is absent: its slot reads as 0, never -1
    record = torch.full((2, k), -5.0)
    top_i, top_w, slots, src = moe_kernels.route(logits, table, k, norm_topk_prob=True, record=record)
    assert src is None  # no device policy: nothing is read from the host
    assert record[0].tolist() == top_i.float().tolist() and record[1].tolist() == top_w.float().tolist()
    want_w, want_i = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), k)
    assert top_i.tolist() == want_i.tolist()
    assert (top_w.float() - (want_w / want_w.sum()).to(dtype).float()).abs().max() <= TOL[dtype] / 10
    assert slots.tolist() == table[want_i].clamp(min=0).tolist()
    _, unnormed, _, _ = moe_kernels.route(logits, table, k, norm_topk_prob=False)
    assert (unnormed.float() - want_w.to(dtype).float()).abs().max() <= TOL[dtype] / 10


def test_moe_reads_experts_in_place(dtype):
    h, i, slots_n, k = 48, 40, 9, 3  # not powers of two: the tiles' masks matter
    x, resid = torch.randn(h, dtype=dtype), torch.randn(h, dtype=dtype)
    w1 = torch.randn(slots_n, 2 * i, h, dtype=dtype) / h ** 0.5
    w2 = torch.randn(slots_n, h, i, dtype=dtype) / i ** 0.5
    slots, weights = torch.tensor([7, 2, 5]), torch.rand(k, dtype=dtype)
    want = sum(swiglu(x, w1[s, :i], w1[s, i:], w2[s]) * weights[j] for j, s in enumerate(slots.tolist()))
    got = moe_kernels.moe(x, w1, w2, slots, weights, resid)
    assert (got.float() - (resid + want).float()).abs().max() <= TOL[dtype]
    assert (moe_kernels.moe(x, w1, w2, slots, weights).float() - want.float()).abs().max() <= TOL[dtype]


def test_moe_down_adds_the_experts_in_order_across_row_blocks(dtype, monkeypatch):
    """Small tiles: several row blocks, each finished by whichever of its k programs comes last, which
    leaves the shared counters zeroed for the next call (a graph replay reuses them)."""
    small_tiles(monkeypatch, 8)
    h, i, slots_n, k = 44, 20, 6, 4
    x, resid = torch.randn(h, dtype=dtype), torch.randn(h, dtype=dtype)
    w1 = torch.randn(slots_n, 2 * i, h, dtype=dtype) / h ** 0.5
    w2 = torch.randn(slots_n, h, i, dtype=dtype) / i ** 0.5
    slots, weights = torch.tensor([3, 0, 5, 1]), torch.rand(k, dtype=dtype)
    want = resid.clone()
    for j, s in enumerate(slots.tolist()):  # transformers' order: each expert's weighted product added in turn
        want += swiglu(x, w1[s, :i], w1[s, i:], w2[s]) * weights[j]
    for _ in range(2):
        got = moe_kernels.moe(x, w1, w2, slots, weights, resid)
        assert (got.float() - want.float()).abs().max() <= TOL[dtype]
        assert int(kernels._counter_buffers[(x.device, "moe_down")].abs().sum()) == 0


def quantized_slabs(shape, slots_n, bits, group):
    """Random weights [slots_n, *shape] quantized as checkpoint.quantize stores them in slots: (qweights, scales)."""
    out, cols = shape
    ws = torch.randn(slots_n, out, cols) / cols ** 0.5
    qs = [quantize(w, bits, group) for w in ws]
    return torch.stack([pack(q, bits) for q, _ in qs]), torch.stack([s for _, s in qs])


@pytest.mark.parametrize("bits, group", [(8, 8), (8, 12), (4, 8), (4, 12), (4, 24)])
@pytest.mark.parametrize("tiles", ["whole", "small", "small_prefetched"])
def test_quantized_moe_dequantizes_in_registers(dtype, bits, group, tiles, monkeypatch):
    """int8 and int4 experts read from their slots as stored, against the PyTorch path that dequantizes
    the gathered experts: dims and groups no tile is a power of two of, and (small) tiles of a few rows
    and groups, so that the loops over groups, their masked tails and several row blocks of the down
    kernel run; (prefetched) the gate/up loop reading each tile's bytes one step ahead."""
    if tiles != "whole":
        small_tiles(monkeypatch, 4)
    monkeypatch.setitem(moe_kernels.QUANT_GATE_UP_BLOCKS, bits,
                        dict(moe_kernels.QUANT_GATE_UP_BLOCKS[bits], PREFETCH=tiles == "small_prefetched"))
    h, i, slots_n, k = 48, 24, 7, 3
    w1, s1 = quantized_slabs((2 * i, h), slots_n, bits, group)
    w2, s2 = quantized_slabs((h, i), slots_n, bits, group)
    assert w1.shape[-1] == h * bits // 8 and w2.shape[-1] == i * bits // 8
    quant = (s1, s2, bits, group)
    x, resid = torch.randn(h, dtype=dtype), torch.randn(h, dtype=dtype)
    slots, weights = torch.tensor([5, 0, 3]), torch.rand(k, dtype=dtype)
    for r in (resid, None):
        got = moe_kernels.moe(x, w1, w2, slots, weights, r, quant=quant)
        want = torch_ops.moe(x, w1, w2, slots, weights, r, quant=quant)
        assert (got.float() - want.float()).abs().max() <= TOL[dtype]
    if dtype == torch.float32:  # the 16-bit kernel on the dequantized slabs: the same sums, to float32 rounding
        d1, d2 = dequantize(w1, s1, bits), dequantize(w2, s2, bits)
        assert (got - moe_kernels.moe(x, d1, d2, slots, weights)).abs().max() <= TOL[dtype]
    assert int(kernels._counter_buffers[(x.device, "moe_down")].abs().sum()) == 0


@pytest.mark.parametrize("bits, group", [(8, 8), (4, 12)])
@pytest.mark.parametrize("tiles", ["whole", "small"])
def test_quantized_moe_reads_absent_experts_from_the_host_tier_in_place(dtype, bits, group, tiles, monkeypatch):
    """Quantized experts absent from the slots (src >= 0) read from a host tier laid out as the layer file
    stores them (each expert's qweights, then its float16 scales, back to back) and written through into
    their slots; an expert that is there (src -1) read from its slot. Against the PyTorch path on slabs
    that already hold every expert, and the slots' bytes afterwards."""
    if tiles == "small":
        small_tiles(monkeypatch, 4)
    h, i, n_experts, k = 48, 24, 6, 3
    w1, s1 = quantized_slabs((2 * i, h), n_experts, bits, group)
    w2, s2 = quantized_slabs((h, i), n_experts, bits, group)
    stored = [torch.cat([t[e].reshape(-1).view(torch.uint8) for t in (w1, w2, s1, s2)]) for e in range(n_experts)]
    pad = torch.zeros(6, dtype=torch.uint8)  # the layer's experts need not start at byte 0
    host = torch.cat([pad, *stored])
    offsets = [len(pad) + sum(len(b) for b in stored[:e]) for e in range(n_experts)]
    experts = [4, 1, 2]  # expert 1 is resident in slot 0; 4 and 2 are absent and land in slots 2 and 3
    slots, src = torch.tensor([2, 0, 3]), torch.tensor([offsets[4], -1, offsets[2]])
    q1, q2 = torch.zeros(4, *w1.shape[1:], dtype=w1.dtype), torch.zeros(4, *w2.shape[1:], dtype=w2.dtype)
    t1, t2 = torch.zeros(4, *s1.shape[1:], dtype=s1.dtype), torch.zeros(4, *s2.shape[1:], dtype=s2.dtype)
    q1[0], q2[0], t1[0], t2[0] = w1[1], w2[1], s1[1], s2[1]
    x, resid = torch.randn(h, dtype=dtype), torch.randn(h, dtype=dtype)
    weights = torch.rand(k, dtype=dtype)
    got = moe_kernels.moe(x, q1, q2, slots, weights, resid, host=(host, src), quant=(t1, t2, bits, group))
    want = torch_ops.moe(x, w1, w2, torch.tensor(experts), weights, resid, quant=(s1, s2, bits, group))
    assert (got.float() - want.float()).abs().max() <= TOL[dtype]
    for slot, e in zip(slots.tolist(), experts):  # written through: the slot now holds the expert as stored
        assert torch.equal(q1[slot], w1[e]) and torch.equal(q2[slot], w2[e])
        assert torch.equal(t1[slot], s1[e]) and torch.equal(t2[slot], s2[e])
    assert torch.equal(q1[1], torch.zeros_like(q1[1]))  # no other slot is touched


@pytest.mark.parametrize("bits, group", [(8, 8), (4, 12), (8, 24), (4, 24)])
@pytest.mark.parametrize("tiles", ["whole", "small"])
def test_grouped_linear_dequantizes_tiles_in_registers(dtype, bits, group, tiles, monkeypatch):
    """The prompt's grouped GEMM over quantized slabs (rows sorted by slot, an empty slot among them) against
    torch's grouped GEMM over the dequantized slabs, the path MoE._grouped takes without it; small tiles
    loop over row tiles, column tiles and (group 24 in steps of 16 columns) a group's steps with a masked
    tail."""
    if tiles == "small":
        small_tiles(monkeypatch, 16)
    n_in, n_out = 48, 40
    w, s = quantized_slabs((n_out, n_in), 5, bits, group)
    ends = torch.tensor([3, 3, 23, 24, 41], dtype=torch.int32)
    x = torch.randn(41, n_in, dtype=dtype)
    got = moe_kernels.grouped_linear(x, w, ends, (s, bits, group))
    want = torch._grouped_mm(x, dequantize(w, s, bits, dtype).transpose(1, 2), offs=ends)
    assert (got.float() - want.float()).abs().max() <= TOL[dtype]


@pytest.fixture(params=["a_program_per_tile", "programs_loop_over_tiles"])
def gemv_grid(request, monkeypatch):
    """The GEMV's grid as the GPU sizes it: a program per tile of rows, or (PER_SM) fewer programs, each
    taking every so many tiles and reading the next while it sums the one before: here 3 programs over
    10 tiles of 4 rows, the last tile masked."""
    if request.param == "programs_loop_over_tiles":
        import triton
        monkeypatch.setattr(kernels, "_blocks", lambda tuned, **dims: {"BLOCK_N": 4, **{
            k: triton.next_power_of_2(n) for k, n in dims.items() if k != "BLOCK_N"}})
        monkeypatch.setattr(kernels, "GEMV_BLOCKS", dict(kernels.GEMV_BLOCKS, PER_SM=3))
        monkeypatch.setattr(kernels, "_sms", lambda device: 1)


def test_linear_is_f_linear(dtype, gemv_grid):
    x, w = torch.randn(70, dtype=dtype), torch.randn(37, 70, dtype=dtype) / 70 ** 0.5
    assert (kernels.linear(x, w).float() - torch.nn.functional.linear(x, w).float()).abs().max() <= TOL[dtype]


def test_norm_linear_is_the_norm_then_f_linear(dtype, gemv_grid):
    x, d, nw = torch.randn(70, dtype=dtype), torch.randn(70, dtype=dtype), torch.randn(70, dtype=dtype)
    w = torch.randn(37, 70, dtype=dtype) / 70 ** 0.5
    want = torch.nn.functional.linear(rms_norm(x, nw, 1e-6), w)
    assert (kernels.norm_linear(x, nw, 1e-6, w).float() - want.float()).abs().max() <= TOL[dtype]
    out, normed, summed = kernels.norm_linear(x, nw, 1e-6, w, delta=d)
    assert ((summed.float() - (x + d).float()).abs() <= (x + d).float().abs() * 2 ** -7).all()  # see above
    assert (normed.float() - rms_norm(x + d, nw, 1e-6).float()).abs().max() <= TOL[dtype]
    want = torch.nn.functional.linear(rms_norm(x + d, nw, 1e-6), w)
    assert (out.float() - want.float()).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("d, splits", [(16, 1), (16, None), (16, 3), (12, 4)],
                         ids=["whole", "two_ranges", "three_ranges", "head_dim_12"])
def test_attention_writes_the_kv_cache_and_attends_up_to_the_position(dtype, d, splits):
    """Split along the cache (ranges merged by log-sum-exp, empty ranges past the position included), and a
    head_dim that is not a power of two (masked tiles)."""
    heads, kv, seq, pos = 8, 2, 21, 13
    qkv = torch.randn((heads + 2 * kv) * d, dtype=dtype)
    q_norm, k_norm = torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)
    freqs = torch.arange(seq, dtype=torch.float32)[:, None] / (1e6 ** (torch.arange(0, d, 2) / d))[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k_cache, v_cache = torch.randn(2, kv, seq, d, dtype=dtype), torch.randn(2, kv, seq, d, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    mask = torch.arange(seq) <= pos
    mask[3] = False  # a masked entry inside the filled part is honoured too
    got = kernels.attention(qkv, q_norm, k_norm, cos, sin, torch.tensor([pos]), k_cache, v_cache, mask, heads, kv,
                            1e-6, d ** -0.5, splits=splits)
    # the PyTorch path's steps: per-head norms, RoPE, the cache write, SDPA over the cache
    want_q = rms_norm(qkv[: heads * d].view(heads, d), q_norm, 1e-6)
    want_k = rms_norm(qkv[heads * d: (heads + kv) * d].view(kv, d), k_norm, 1e-6)
    c, s = cos[pos], sin[pos]
    want_q, want_k = want_q * c + rotate_half(want_q) * s, want_k * c + rotate_half(want_k) * s
    assert (k_cache[0, :, pos].float() - want_k.float()).abs().max() <= TOL[dtype]
    assert torch.equal(v_cache[0, :, pos], qkv[(heads + kv) * d:].view(kv, d))
    untouched = torch.ones(2, kv, seq, dtype=torch.bool)
    untouched[0, :, pos] = False
    assert torch.equal(k_cache[untouched], k_before[untouched]) and torch.equal(v_cache[untouched], v_before[untouched])
    want = torch.nn.functional.scaled_dot_product_attention(
        want_q.view(1, heads, 1, d), k_cache[:1], v_cache[:1], attn_mask=mask[None], scale=d ** -0.5, enable_gqa=True)
    assert (got.float() - want.reshape(-1).float()).abs().max() <= TOL[dtype]


def test_rms_norm_over_a_prompts_rows(dtype):
    x, d = torch.randn(2, 5, 40, dtype=dtype), torch.randn(2, 5, 40, dtype=dtype)
    w = torch.randn(40, dtype=dtype)
    assert (kernels.rms_norm(x, w, 1e-6).float() - rms_norm(x, w, 1e-6).float()).abs().max() <= TOL[dtype]
    normed, summed = kernels.rms_norm(x, w, 1e-6, delta=d)
    assert (summed.float() - (x + d).float()).abs().max() <= (x + d).float().abs().max() * 2 ** -7
    assert (normed.float() - rms_norm(x + d, w, 1e-6).float()).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("d, heads, kv", [(16, 8, 2), (12, 6, 3)], ids=["gqa", "head_dim_12"])
def test_qkv_heads_norms_and_rotates_every_token_at_its_position(dtype, d, heads, kv):
    """Batch 2, 7 tokens at positions 4..10 of the RoPE tables; a head_dim that is not a power of two, and
    head counts that are not either (masked tiles)."""
    b, t, start, seq = 2, 7, 4, 16
    qkv = torch.randn(b, t, (heads + 2 * kv) * d, dtype=dtype)
    q_norm, k_norm = torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)
    freqs = torch.arange(seq, dtype=torch.float32)[:, None] / (1e6 ** (torch.arange(0, d, 2) / d))[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got = prefill_kernels.qkv_heads(qkv, q_norm, k_norm, cos, sin, start, heads, kv, 1e-6)
    want = qkv_heads(qkv, q_norm, k_norm, cos, sin, start, heads, kv, 1e-6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and close(g, w, dtype)
    assert torch.equal(got[2], want[2])  # v is copied, not computed


def test_silu_mul_is_silu_of_gate_times_up(dtype):
    gate_up = torch.randn(9, 2 * 24, dtype=dtype) * 3
    assert close(prefill_kernels.silu_mul(gate_up), silu_mul(gate_up), dtype)


def test_combine_weights_and_adds_each_tokens_products_wherever_they_lie(dtype):
    n, k, h = 6, 3, 40
    y = torch.randn(n * k, h, dtype=dtype)
    rows = torch.randperm(n * k)  # the products in the order their experts ran
    weights = torch.rand(n, k, dtype=dtype)
    got = prefill_kernels.combine(y, rows, weights)
    assert close(got, combine(y, rows, weights), dtype)
    # and the sum it stands for: token n's choice j is y[rows[n * k + j]]
    want = sum(y[rows.view(n, k)[:, j]].float() * weights[:, j, None].float() for j in range(k))
    assert (got.float() - want).abs().max() <= 4 * TOL[dtype]


def test_expert_counts_are_bincounts_one_layer_or_several():
    """The prompt's per-expert counts without torch.bincount (a host round trip on CUDA): the same counts,
    for one layer's ids and for several layers' stacked, unused experts counted 0."""
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (3, 40))  # three layers of 10 tokens x top-4; experts 7..9 never chosen
    for row in ids:
        assert torch.equal(expert_counts(row, 10), torch.bincount(row, minlength=10))
    assert torch.equal(expert_counts(ids, 10), torch.stack([torch.bincount(row, minlength=10) for row in ids]))


def test_unserved_names_what_the_kernels_cannot_take():
    assert kernels.unserved(2048, 128, 768) is None and kernels.unserved(48, 12, 24) is None
    assert "head_dim 13 is odd" in kernels.unserved(64, 13, 32)
    assert "hidden_size 32768" in kernels.unserved(32768, 128, 768)


def test_merge_by_lse_is_attention_over_both_key_sets(dtype):
    """A later chunk's two attentions (strided outputs, as cuDNN returns them) merged: equal to the model's
    PyTorch merge, and to one softmax over all the keys."""
    from moe_offload.runtime.model import merge_by_lse

    b, h, t, d, s1, s2 = 2, 3, 5, 12, 7, 6
    q = torch.randn(b, h, t, d, dtype=torch.float32)
    k, v = torch.randn(b, h, s1 + s2, d), torch.randn(b, h, s1 + s2, d)
    scores = q @ k.transpose(-1, -2)

    def part(lo, hi):
        w = scores[..., lo:hi]
        out = torch.softmax(w, -1) @ v[:, :, lo:hi]
        return out.to(dtype).transpose(1, 2).contiguous().transpose(1, 2), torch.logsumexp(w, -1)

    (x, lx), (y, ly) = part(0, s1), part(s1, s1 + s2)
    got = prefill_kernels.merge_by_lse(x, lx, y, ly)
    assert got.shape == (b, h, t, d) and close(got, merge_by_lse(x, lx, y, ly), dtype)
    assert close(got, (torch.softmax(scores, -1) @ v).to(dtype), dtype)
