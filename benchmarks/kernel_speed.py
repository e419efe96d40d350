"""Where one decoded layer's time goes, at the real Qwen3-Omni thinker's dims, on a GPU: each step of the
fused decode path timed alone inside a CUDA graph, its weights evicted from L2 first, next to the bytes it
must read and the HBM bandwidth measured in the same run (probes.hbm_probe on 8.6 GB);
the kernels' tile shapes swept (the GEMV's programs looping over tiles and the quantized gate/up's prefetch
among them); the whole layer as one CUDA graph against its byte bound, with the committed tiles and with the
sweep's best; and a profile of that graph, kernel by kernel. Then the same expert kernels reading int8 and
int4 experts (checkpoint.quantize's form, group --group) in place, against the bytes of their qweights and
scales, their tiles swept too, and a prompt chunk's grouped GEMM over quantized slabs
(moe_kernels.grouped_linear) against dequantize-then-torch; and the int4 step with its experts read through
from a pinned host tier, against the zero-copy probe, its tensor-core tiles swept.

  python3 benchmarks/kernel_speed.py --out benchmarks/results/kernel_speed.json
  python3 benchmarks/kernel_speed.py --quantized-only --out benchmarks/results/kernel_speed_quantized.json
  python3 benchmarks/kernel_speed.py --attention-lengths 36,2048,8192,32768 \
      --out benchmarks/results/attention_splits.json

--attention-lengths times only the decode attention kernel (and SDPA over the same cache, for reference) at
each cache length, with the runtime's choice of ranges and a sweep of ranges and tiles, against the KV bytes
it must read.

Only torch and triton (and the package, from src/) are imported: it runs on the GPU machine's stock python3.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from moe_offload.checkpoint.dims import DIMS  # noqa: E402
from moe_offload.runtime import kernels, moe_kernels  # noqa: E402
from common import emit  # noqa: E402
from probes import hbm_probe, median_seconds as bench, zero_copy_probe  # noqa: E402

H, I, E, K, HEADS, KV, D, V = (DIMS["real"][key] for key in (
    "hidden_size", "moe_intermediate_size", "num_experts", "experts_per_token", "num_heads", "num_kv_heads",
    "head_dim", "vocab_size"))


_FLUSH = None
_FLUSH_SECONDS = None


def bench_graph(fn, calls: int = 20) -> float:
    """Seconds per call of fn's GPU work: `calls` calls captured in one CUDA graph, each after a write of
    128 MB that evicts the 50 MB L2 (its own time, measured the same way, subtracted), so every call
    reads its weights from HBM as a decode step does. (A kernel of a few microseconds launched from Python
    measures the launch, not the kernel.)"""
    global _FLUSH, _FLUSH_SECONDS
    if _FLUSH is None:
        _FLUSH = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")

    def replay_time(body):
        body()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                _FLUSH.zero_()
                body()
        return bench(g.replay) / calls
    if _FLUSH_SECONDS is None:
        _FLUSH_SECONDS = replay_time(lambda: None)
    return replay_time(fn) - _FLUSH_SECONDS


def kernel_times(fn, calls: int, per_call: int = 1) -> dict[str, float]:
    """GPU time per kernel name, µs per call / per_call (e.g. per layer of an 8-layer graph), from
    torch.profiler's CUDA activity over `calls` calls; inside CUDA graphs too."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:60]
            times[name] = times.get(name, 0.0) + ev.device_time / calls / per_call
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def dequantize(q, s, bits, group, dtype):
    """checkpoint.quantize.dequantize (which imports safetensors), for the PyTorch path's reference."""
    if bits == 4:  # the even input column in the low nibble, stored as q + 8
        q = torch.stack(((q & 15).view(torch.int8) - 8, (q >> 4).view(torch.int8) - 8), -1).flatten(-2)
    return (q.float().unflatten(-1, (-1, group)) * s.float()[..., None]).flatten(-2).to(dtype)


def quantized(result, hbm, x, slots, weights, n_slots, group, tokens):
    """The MoE kernels on int8 and int4 slabs of n_slots experts (random values: the time does not depend on
    them) against the bytes they must read, k experts' qweights and scales; their tiles swept (the 16-bit
    tiles' sweep, on the quantized kernels), and the PyTorch path (gather, dequantize, two products)."""
    dev, dt = x.device, x.dtype
    out = result["quantized"] = {"group_size": group}
    for bits in (8, 4):
        def qweight(*shape):  # [slots, out, in] as stored: int8, or int4 nibbles two to a byte
            if bits == 8:
                return torch.randint(-127, 128, (n_slots, *shape), dtype=torch.int8, device=dev)
            return torch.randint(0, 256, (n_slots, shape[0], shape[1] // 2), dtype=torch.uint8, device=dev)

        def scales(rows, cols):
            return (torch.rand(n_slots, rows, cols // group, device=dev) / 64).half()
        w1, w2, s1, s2 = qweight(2 * I, H), qweight(H, I), scales(2 * I, H), scales(H, I)
        quant = (s1, s2, bits, group)
        expert_bytes = w1[0].nbytes + w2[0].nbytes + s1[0].nbytes + s2[0].nbytes
        nbytes = K * expert_bytes

        def gathered():  # torch_ops.moe: a 16-bit copy of the k experts, then two batched products
            g1, g2 = dequantize(w1[slots], s1[slots], bits, group, dt), dequantize(w2[slots], s2[slots], bits, group, dt)
            gate, up = torch.matmul(g1, x).chunk(2, dim=-1)
            y = torch.matmul(g2, (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            return x + (y * weights[:, None]).sum(0)

        def fused():
            return moe_kernels.moe(x, w1, w2, slots, weights, x, quant=quant)
        row = out[f"int{bits}"] = {"expert_bytes": expert_bytes, "expert_bytes_bf16": 3 * H * I * 2, "steps": {}}
        for name, fn in {"moe_fused": fused, "moe_gathered_torch": gathered}.items():
            s = bench_graph(fn)
            row["steps"][name] = {"us": s * 1e6, "bytes": nbytes, "bound_us": nbytes / hbm * 1e6,
                                  "fraction_of_bound": nbytes / hbm / s}
        sweep = {"gate_up": [], "moe_by_down_tiles": []}
        act = torch.empty(K, I, dtype=dt, device=dev)
        per_group = triton.next_power_of_2(group * bits // 8)
        for bi, bg, nw, pf in itertools.product([1, 2, 4, 8, 16], [4, 8, 16], [2, 4, 8], [False, True]):
            if bg > H // group:
                continue
            fn = lambda: moe_kernels._moe_gate_up_kernel[(K, -(-I // bi))](  # noqa: E731
                x, w1, s1, slots, act, w1, s1, slots, w1.stride(0), s1.stride(0), H=H, I=I, HOST=False, BITS=bits,
                GROUP=group, BLOCK_I=bi, BLOCK_H=1, BLOCK_G=bg, BLOCK_J=per_group, num_warps=nw, PDL=False,
                PREFETCH=pf)
            sweep["gate_up"].append({"BLOCK_I": bi, "BLOCK_G": bg, "num_warps": nw, "PREFETCH": pf,
                                     "us": bench_graph(fn) * 1e6})
        tuned = dict(moe_kernels.QUANT_DOWN_BLOCKS[bits])
        for bh, nw in itertools.product([1, 2, 4, 8, 16, 32], [1, 2, 4, 8]):
            moe_kernels.QUANT_DOWN_BLOCKS[bits] = dict(BLOCK_H=bh, num_warps=nw)
            sweep["moe_by_down_tiles"].append({"BLOCK_H": bh, "num_warps": nw, "us": bench_graph(fused) * 1e6})
        moe_kernels.QUANT_DOWN_BLOCKS[bits] = tuned
        read = {"gate_up": K * (w1[0].nbytes + s1[0].nbytes), "moe_by_down_tiles": nbytes}
        for k in sweep:
            for r in sweep[k]:
                r["fraction_of_bound"] = read[k] / hbm / (r["us"] / 1e6)
            sweep[k].sort(key=lambda r: r["us"])
        row["tile_sweep_top5"] = {k: v[:5] for k, v in sweep.items()}
        moe_kernels.QUANT_GATE_UP_BLOCKS[bits] = {k: sweep["gate_up"][0][k]
                                                  for k in ("BLOCK_I", "BLOCK_G", "num_warps", "PREFETCH")}
        moe_kernels.QUANT_DOWN_BLOCKS[bits] = {k: sweep["moe_by_down_tiles"][0][k] for k in ("BLOCK_H", "num_warps")}
        s = bench_graph(fused)
        row["moe_fused_best_tiles"] = {"gate_up": moe_kernels.QUANT_GATE_UP_BLOCKS[bits],
                                       "down": moe_kernels.QUANT_DOWN_BLOCKS[bits], "us": s * 1e6, "bytes": nbytes,
                                       "bound_us": nbytes / hbm * 1e6, "fraction_of_bound": nbytes / hbm / s}
        row["prefill_grouped"] = prefill_grouped(w1, w2, s1, s2, bits, group, tokens, hbm, dt)
        if bits == 4:
            row["from_host_tier"] = from_host_tier(x, w1, w2, s1, s2, slots, weights, group)
        del w1, w2, s1, s2
        torch.cuda.empty_cache()


def from_host_tier(x, w1, w2, s1, s2, slots, weights, group):
    """The int4 step with every one of its K experts (then 6 of them) read through from a pinned host tier
    in place, against the zero-copy probe's rate: the CUDA-core tiles resident steps take, and
    _nibble_products' tensor-core tiles (moe_kernels.HOST_INT4_BLOCKS), swept."""
    expert_bytes = w1[0].nbytes + w2[0].nbytes + s1[0].nbytes + s2[0].nbytes
    host = torch.randint(0, 256, (2 * K * expert_bytes,), dtype=torch.uint8).pin_memory()  # values: any bytes
    rate = zero_copy_probe(x.device)["bytes_per_second"]
    out = {"zero_copy_bytes_per_second": rate, "expert_bytes": expert_bytes}

    def step(n_host: int) -> dict:
        src = torch.tensor([j * expert_bytes if j < n_host else -1 for j in range(K)], device=x.device)
        us = bench_graph(lambda: moe_kernels.moe(x, w1, w2, slots, weights, x, host=(host, src),
                                                 quant=(s1, s2, 4, group))) * 1e6
        return {"us": us, "fraction_of_zero_copy": n_host * expert_bytes / rate / (us / 1e6)}
    tuned = moe_kernels.HOST_INT4_BLOCKS
    for n in (K, 6):
        out[f"{n}_from_host_committed_tiles"] = step(n)
    sweep = []
    for (gi, gk, gs), (dh, dk, ds), nw in itertools.product(
            [(64, 512, 3), (32, 512, 3), (64, 512, 4), (64, 1024, 2), (128, 512, 3), (32, 256, 4)],
            [(64, 256, 2), (32, 256, 3), (64, 256, 3), (128, 256, 2)], [4, 8]):
        moe_kernels.HOST_INT4_BLOCKS = dict(gate_up=dict(BLOCK_I=gi, KC=gk, STAGES=gs, num_warps=nw),
                                            down=dict(BLOCK_H=dh, KC=dk, STAGES=ds, num_warps=nw))
        sweep.append({**moe_kernels.HOST_INT4_BLOCKS, **step(K)})
    moe_kernels.HOST_INT4_BLOCKS = tuned
    out["tile_sweep_top5"] = sorted(sweep, key=lambda r: r["us"])[:5]
    return out


def prefill_grouped(w1, w2, s1, s2, bits, group, tokens, hbm, dt):
    """A prompt chunk's experts as MoE._grouped runs them: `tokens` x K pairs sorted by slot, the gate/up
    and down grouped GEMMs through moe_kernels.grouped_linear on the quantized slabs (tiles swept) and
    through torch's grouped GEMM after dequantizing the slabs (the path without the kernel)."""
    n_slots, dev = w1.shape[0], w1.device
    key = torch.randint(0, n_slots, (tokens * K,), device=dev).sort().values
    offs = torch.bincount(key, minlength=n_slots).cumsum(0).to(torch.int32)
    xs = torch.randn(tokens * K, H, dtype=dt, device=dev)

    def kernel():
        gate, up = moe_kernels.grouped_linear(xs, w1, offs, (s1, bits, group)).chunk(2, dim=-1)
        return moe_kernels.grouped_linear(F.silu(gate) * up, w2, offs, (s2, bits, group))

    def dequantized():
        d1, d2 = dequantize(w1, s1, bits, group, dt), dequantize(w2, s2, bits, group, dt)
        gate, up = torch._grouped_mm(xs, d1.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, d2.transpose(1, 2), offs=offs)
    nbytes = w1.nbytes + w2.nbytes + s1.nbytes + s2.nbytes  # every slot has pairs
    flops = 2 * tokens * K * 3 * H * I
    out = {"tokens": tokens, "pairs": tokens * K, "slots": n_slots, "bytes": nbytes, "bound_us": nbytes / hbm * 1e6,
           "flop": flops, "sweep_top5": []}
    table = moe_kernels.grouped_tiles(tokens * K, n_slots)  # the short prompts' table or the long ones'
    out["table"] = "short" if table is moe_kernels.GROUPED_QUANT_SHORT_BLOCKS else "long"
    tuned = dict(table[bits])
    for bm, bn, nw, ns in itertools.product([16, 32, 64, 128], [64, 128, 256], [4, 8], [2, 3]):
        table[bits] = dict(tuned, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
        us = bench_graph(kernel) * 1e6
        out["sweep_top5"].append({**table[bits], "us": us, "tflops": flops / us / 1e6})
    out["sweep_top5"] = sorted(out["sweep_top5"], key=lambda r: r["us"])[:5]
    table[bits] = tuned
    s = bench_graph(dequantized)
    out["dequantize_then_torch_grouped_mm"] = {"us": s * 1e6, "tflops": flops / s / 1e12}
    return out


def attention_sweep(hbm: float, lengths: list[int]) -> dict:
    """The decode attention kernel per cache length: the runtime's ranges (splits None), then a sweep of
    ranges and KV tiles; SDPA over the same cache beside it. A token at position L of a cache of L + 16."""
    dev, dt, out = torch.device("cuda"), torch.bfloat16, {}
    base = dict(kernels.ATTENTION_BLOCKS)
    for length in lengths:
        seq = length + 16
        qkv = torch.randn((HEADS + 2 * KV) * D, dtype=dt, device=dev)
        qn, kn = torch.randn(D, dtype=dt, device=dev), torch.randn(D, dtype=dt, device=dev)
        cos, sin = torch.randn(seq, D, dtype=dt, device=dev), torch.randn(seq, D, dtype=dt, device=dev)
        kc, vc = (torch.randn(1, KV, seq, D, dtype=dt, device=dev) for _ in range(2))
        pos, mask = torch.tensor([length], device=dev), torch.ones(seq, dtype=torch.bool, device=dev)
        seen = (torch.arange(seq, device=dev) <= length).view(1, 1, 1, seq)

        def attend(splits=None):
            return kernels.attention(qkv, qn, kn, cos, sin, pos, kc, vc, mask, HEADS, KV, 1e-6, D ** -0.5, splits)

        def sdpa():
            return F.scaled_dot_product_attention(qkv[:HEADS * D].view(1, HEADS, 1, D), kc, vc, attn_mask=seen,
                                                  scale=D ** -0.5, enable_gqa=True)
        nbytes = 2 * KV * (length + 1) * D * dt.itemsize
        row = {"kv_bytes": nbytes, "bound_us": nbytes / hbm * 1e6, "runtime_us": bench_graph(attend) * 1e6,
               "sdpa_us": bench_graph(sdpa) * 1e6, "sweep_top5": []}
        for splits, bs in itertools.product([1, 8, 16, 33, 66, 132, 264], [32, 64, 128]):
            if splits <= triton.cdiv(seq, bs):
                kernels.ATTENTION_BLOCKS = dict(base, BLOCK_S=bs)
                us = bench_graph(lambda: attend(splits)) * 1e6
                row["sweep_top5"].append({"splits": splits, "BLOCK_S": bs, "us": us})
        kernels.ATTENTION_BLOCKS = base
        row["sweep_top5"] = sorted(row["sweep_top5"], key=lambda r: r["us"])[:5]
        row["fraction_of_bound"] = row["bound_us"] / row["runtime_us"]
        out[length] = row
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slots", type=int, default=64, help="experts resident in the slab (past L2 at 64)")
    p.add_argument("--seq", type=int, default=128, help="KV cache length attention reads")
    p.add_argument("--group", type=int, default=128, help="quantized experts' group size")
    p.add_argument("--prefill-tokens", type=int, default=512, help="a prompt chunk, for the quantized grouped GEMM")
    p.add_argument("--quantized-only", action="store_true", help="the HBM probe and the quantized experts only")
    p.add_argument("--attention-lengths", default="", help="only the decode attention kernel, at these cache lengths")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    hbm = hbm_probe(dev, rows=1 << 20)["bytes_per_second"]  # 8.6 GB read; the faster of cuBLAS and our GEMV
    result = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "hbm_bytes_per_second": hbm,
              "dims": dict(H=H, I=I, E=E, K=K, heads=HEADS, kv=KV, D=D, seq=a.seq, slots=a.slots), "steps": {}}
    if a.attention_lengths:  # before the layer's weights and the LM head are allocated
        result["attention"] = attention_sweep(hbm, [int(n) for n in a.attention_lengths.split(",")])
        emit(result, a.out)
        return

    x = torch.randn(H, dtype=dt, device=dev)
    wqkv = torch.randn((HEADS + 2 * KV) * D, H, dtype=dt, device=dev) / H ** 0.5
    wo = torch.randn(H, HEADS * D, dtype=dt, device=dev) / H ** 0.5
    router = torch.randn(E, H, dtype=dt, device=dev) / H ** 0.5
    norm_w = torch.randn(H, dtype=dt, device=dev)
    qn, kn = torch.randn(D, dtype=dt, device=dev), torch.randn(D, dtype=dt, device=dev)
    cos, sin = torch.randn(a.seq, D, dtype=dt, device=dev), torch.randn(a.seq, D, dtype=dt, device=dev)
    kc = torch.randn(1, KV, a.seq, D, dtype=dt, device=dev)
    vc = torch.randn(1, KV, a.seq, D, dtype=dt, device=dev)
    pos = torch.tensor([a.seq - 1], device=dev)
    mask = torch.ones(1, a.seq, dtype=torch.bool, device=dev)
    w1 = torch.randn(a.slots, 2 * I, H, dtype=dt, device=dev) / H ** 0.5
    w2 = torch.randn(a.slots, H, I, dtype=dt, device=dev) / I ** 0.5
    table = torch.randperm(E, device=dev) % a.slots
    slots = torch.randperm(a.slots, device=dev)[:K]
    weights = torch.rand(K, dtype=dt, device=dev)
    x_heads = torch.randn(HEADS * D, dtype=dt, device=dev)
    lm_head = torch.randn(V, H, dtype=dt, device=dev) / H ** 0.5
    qkv = F.linear(x, wqkv)
    expert_bytes = 3 * H * I * 2

    def attention():  # norms, RoPE, the cache write and attention over the cache, one kernel
        return kernels.attention(qkv, qn, kn, cos, sin, pos, kc, vc, mask[0], HEADS, KV, 1e-6, D ** -0.5)

    def attention_sdpa():  # the library's attention alone, for reference
        return F.scaled_dot_product_attention(qkv[:HEADS * D].view(1, HEADS, 1, D), kc, vc, attn_mask=mask,
                                              scale=D ** -0.5, enable_gqa=True)

    def gathered():  # the PyTorch path: copy the k experts out of the slab, then two batched products
        gate, up = torch.matmul(w1[slots], x).chunk(2, dim=-1)
        y = torch.matmul(w2[slots], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y * weights[:, None]).sum(0)

    steps = {  # name: (function, bytes it must read)
        "rms_norm_add": (lambda: kernels.rms_norm(x, norm_w, 1e-6, delta=x), 3 * H * 2),
        "qkv_linear": (lambda: F.linear(x, wqkv), wqkv.nbytes),
        "attention_fused": (attention, kc.nbytes + vc.nbytes),
        "attention_sdpa_alone": (attention_sdpa, kc.nbytes + vc.nbytes),
        "norm_linear_qkv": (lambda: kernels.norm_linear(x, norm_w, 1e-6, wqkv), wqkv.nbytes),
        "add_norm_linear_router": (lambda: kernels.norm_linear(x, norm_w, 1e-6, router, delta=x), router.nbytes),
        "o_linear": (lambda: F.linear(x_heads, wo), wo.nbytes),
        "router_linear": (lambda: F.linear(x, router), router.nbytes),
        "route": (lambda: moe_kernels.route(x[:E], table, K, True), E * 2),
        "moe_fused": (lambda: moe_kernels.moe(x, w1, w2, slots, weights, x), K * expert_bytes),
        "moe_gathered_torch": (lambda: gathered(), K * expert_bytes),
        "lm_head_cublas": (lambda: F.linear(x, lm_head), lm_head.nbytes),
        "lm_head_norm_linear": (lambda: kernels.norm_linear(x, norm_w, 1e-6, lm_head), lm_head.nbytes),
    }
    quantized(result, hbm, x, slots, weights, a.slots, a.group, a.prefill_tokens)
    if a.quantized_only:
        emit(result, a.out)
        return
    for name, (fn, nbytes) in steps.items():
        s = bench_graph(fn)
        result["steps"][name] = {"us": s * 1e6, "bytes": nbytes, "bound_us": nbytes / hbm * 1e6,
                                 "fraction_of_bound": nbytes / hbm / s}

    # One whole layer as a CUDA graph, as the decode step replays it (Block.forward_fused's kernels): with
    # the committed tiles here, with the sweep's below.
    layer_bytes = wqkv.nbytes + wo.nbytes + router.nbytes + K * expert_bytes

    def layer():
        y = kernels.attention(kernels.norm_linear(x, norm_w, 1e-6, wqkv), qn, kn, cos, sin, pos, kc, vc, mask[0],
                              HEADS, KV, 1e-6, D ** -0.5)
        logits, h2, r = kernels.norm_linear(x, norm_w, 1e-6, router, delta=kernels.linear(y, wo))
        ti, tw, sl, _ = moe_kernels.route(logits, table, K, True)
        return moe_kernels.moe(h2, w1, w2, sl, tw, r)

    def layer_graph():
        layer()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(8):  # eight layers per replay, so the launch of the graph itself is amortised
                layer()
        return g, bench(g.replay) / 8
    s = layer_graph()[1]
    result["layer_graph_committed_tiles"] = {"us": s * 1e6, "bytes": layer_bytes, "bound_us": layer_bytes / hbm * 1e6,
                                             "fraction_of_bound": layer_bytes / hbm / s}

    # The MoE kernels' tiles and the projections' GEMV tiles (a program per tile, or PER_SM programs per SM
    # looping over tiles): each alone, then the best together.
    sweep = {"gate_up": [], "moe_by_down_tiles": [], "gemv_qkv_plus_o": []}
    i_act = torch.randn(K, I, dtype=dt, device=dev)
    for bi, bh, nw in itertools.product([1, 2, 4, 8], [1024, 2048], [2, 4, 8]):
        fn = lambda: moe_kernels._moe_gate_up_kernel[(K, -(-I // bi))](  # noqa: E731
            x, w1, w1, slots, i_act, w1, w1, slots, w1.stride(0), 0, H=H, I=I, HOST=False, BITS=16, GROUP=1, BLOCK_I=bi,
            BLOCK_H=bh, BLOCK_G=1, BLOCK_J=1, num_warps=nw, PDL=False)
        sweep["gate_up"].append({"BLOCK_I": bi, "BLOCK_H": bh, "num_warps": nw, "us": bench_graph(fn) * 1e6})
    for bh, nw in itertools.product([1, 2, 4, 8, 16], [1, 2, 4, 8]):
        moe_kernels.DOWN_BLOCKS = dict(BLOCK_H=bh, num_warps=nw)
        sweep["moe_by_down_tiles"].append({"BLOCK_H": bh, "num_warps": nw,
                              "us": bench_graph(lambda: moe_kernels.moe(x, w1, w2, slots, weights, x)) * 1e6})
    for bn, nw, per_sm in itertools.product([1, 2, 4, 8], [2, 4, 8], [0, 4, 8, 16]):
        kernels.GEMV_BLOCKS = dict(BLOCK_N=bn, num_warps=nw, PER_SM=per_sm)
        us = (bench_graph(lambda: kernels.linear(x, wqkv)) + bench_graph(lambda: kernels.linear(x_heads, wo))) * 1e6
        sweep["gemv_qkv_plus_o"].append({"BLOCK_N": bn, "num_warps": nw, "PER_SM": per_sm, "us": us})
    sweep["attention"] = []
    for bs, nw in itertools.product([16, 32, 64, 128], [1, 2, 4, 8]):
        kernels.ATTENTION_BLOCKS = dict(kernels.ATTENTION_BLOCKS, BLOCK_S=bs, num_warps=nw)
        sweep["attention"].append({"BLOCK_S": bs, "num_warps": nw, "us": bench_graph(attention) * 1e6})
    sweep["route_and_rms_norm"] = []
    for nw in [1, 2, 4, 8]:
        kernels.SMALL_BLOCKS = dict(num_warps=nw)
        us = (bench_graph(lambda: moe_kernels.route(x[:E], table, K, True))
              + bench_graph(lambda: kernels.rms_norm(x, norm_w, 1e-6, delta=x))) * 1e6
        sweep["route_and_rms_norm"].append({"num_warps": nw, "us": us})
    read = {"gate_up": K * 2 * I * H * 2, "moe_by_down_tiles": K * expert_bytes,
            "gemv_qkv_plus_o": wqkv.nbytes + wo.nbytes, "attention": kc.nbytes + vc.nbytes,
            "route_and_rms_norm": E * 2 + 3 * H * 2}
    for k in sweep:
        for r in sweep[k]:
            r["fraction_of_bound"] = read[k] / hbm / (r["us"] / 1e6)
        sweep[k].sort(key=lambda r: r["us"])
    result["tile_sweep_top5"] = {k: v[:5] for k, v in sweep.items()}
    pick = lambda row, keys: {k: row[k] for k in keys}  # noqa: E731
    moe_kernels.GATE_UP_BLOCKS = pick(sweep["gate_up"][0], ("BLOCK_I", "BLOCK_H", "num_warps"))
    moe_kernels.DOWN_BLOCKS = pick(sweep["moe_by_down_tiles"][0], ("BLOCK_H", "num_warps"))
    kernels.GEMV_BLOCKS = pick(sweep["gemv_qkv_plus_o"][0], ("BLOCK_N", "num_warps", "PER_SM"))
    kernels.ATTENTION_BLOCKS = dict(kernels.ATTENTION_BLOCKS, **pick(sweep["attention"][0], ("BLOCK_S", "num_warps")))
    kernels.SMALL_BLOCKS = pick(sweep["route_and_rms_norm"][0], ("num_warps",))
    s = bench_graph(lambda: moe_kernels.moe(x, w1, w2, slots, weights, x))
    result["moe_fused_best_tiles"] = {"gate_up": moe_kernels.GATE_UP_BLOCKS, "down": moe_kernels.DOWN_BLOCKS,
                                      "us": s * 1e6,
                                      "fraction_of_bound": K * expert_bytes / hbm / s}
    for name, (wt, xin) in {"qkv": (wqkv, x), "o": (wo, x_heads)}.items():
        s = bench_graph(lambda: kernels.linear(xin, wt))
        result["steps"][f"{name}_gemv_triton"] = {"us": s * 1e6, "bytes": wt.nbytes, "bound_us": wt.nbytes / hbm * 1e6,
                                                  "fraction_of_bound": wt.nbytes / hbm / s}

    for pdl in (False, True):  # programmatic dependent launch off, then on (the runtime's default)
        kernels.PDL = pdl
        g, s = layer_graph()
        result["layer_graph" + ("" if pdl else "_without_pdl")] = {"us": s * 1e6, "bytes": layer_bytes,
                                                                    "bound_us": layer_bytes / hbm * 1e6,
                                                                    "fraction_of_bound": layer_bytes / hbm / s}
    # Profiled last: once the profiler has run in a process, later launches are slower (docs/benchmarks.md).
    # Back-to-back replays: the weights of 8 layers (0.9 GB) do not stay in the 50 MB L2.
    result["profile_layer_graph_us_per_layer"] = kernel_times(g.replay, 20, 8)
    result["profile_moe_us"] = kernel_times(lambda: moe_kernels.moe(x, w1, w2, slots, weights, x), 50)
    emit(result, a.out)


if __name__ == "__main__":
    main()
