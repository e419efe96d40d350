"""Where one decoded layer's time goes, at the real Qwen3-Omni thinker's dims, on a GPU: each step of the
fused decode path timed alone (CUDA events through triton.testing.do_bench, median), next to the bytes it
must read and the HBM bandwidth measured in the same run; the MoE kernels' tile shapes swept; and the
whole layer as one CUDA graph, against the sum of its parts and its byte bound.

  python3 benchmarks/kernel_speed.py --out benchmarks/results/kernel_speed.json

Only torch and triton are imported: it runs on the GPU machine's stock python3.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from moe_offload.runtime import kernels  # noqa: E402
from common import emit  # noqa: E402

H, I, E, K, HEADS, KV, D, V = 2048, 768, 128, 8, 32, 4, 128, 152064


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1000  # seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slots", type=int, default=64, help="experts resident in the slab (past L2 at 64)")
    p.add_argument("--seq", type=int, default=128, help="KV cache length attention reads")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(65536, 32768, dtype=dt, device=dev)
    v = torch.randn(32768, dtype=dt, device=dev)
    hbm = w.nbytes / bench(lambda: torch.mv(w, v))
    del w
    torch.cuda.empty_cache()

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
    qkv = F.linear(x, wqkv)
    q = kernels.qk_norm_rope_kv(qkv, qn, kn, cos, sin, pos, kc, vc, HEADS, KV, 1e-6)
    expert_bytes = 3 * H * I * 2

    def attention():
        return F.scaled_dot_product_attention(q.view(1, HEADS, 1, D), kc, vc, attn_mask=mask, scale=D ** -0.5,
                                              enable_gqa=True)

    def gathered():  # the PyTorch path: copy the k experts out of the slab, then two batched products
        gate, up = torch.matmul(w1[slots], x).chunk(2, dim=-1)
        y = torch.matmul(w2[slots], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y * weights[:, None]).sum(0)

    steps = {  # name: (function, bytes it must read)
        "rms_norm_add": (lambda: kernels.rms_norm(x, norm_w, 1e-6, delta=x), 3 * H * 2),
        "qkv_linear": (lambda: F.linear(x, wqkv), wqkv.nbytes),
        "qk_norm_rope_kv": (lambda: kernels.qk_norm_rope_kv(qkv, qn, kn, cos, sin, pos, kc, vc, HEADS, KV, 1e-6),
                            qkv.nbytes),
        "attention_sdpa": (attention, kc.nbytes + vc.nbytes),
        "o_linear": (lambda: F.linear(x_heads, wo), wo.nbytes),
        "router_linear": (lambda: F.linear(x, router), router.nbytes),
        "route": (lambda: kernels.route(x[:E], table, K, True), E * 2),
        "moe_fused": (lambda: kernels.moe(x, w1, w2, slots, weights, x), K * expert_bytes),
        "moe_gathered_torch": (lambda: gathered(), K * expert_bytes),
    }
    result = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "hbm_bytes_per_second": hbm,
              "dims": dict(H=H, I=I, E=E, K=K, heads=HEADS, kv=KV, D=D, seq=a.seq, slots=a.slots), "steps": {}}
    for name, (fn, nbytes) in steps.items():
        s = bench(fn)
        result["steps"][name] = {"us": s * 1e6, "bytes": nbytes, "bound_us": nbytes / hbm * 1e6,
                                 "fraction_of_bound": nbytes / hbm / s}

    # The MoE kernels' tiles: each alone, then the best pair.
    sweep = {"gate_up": [], "down": []}
    i_act = torch.randn(K, I, dtype=dt, device=dev)
    for bi, bh, nw in itertools.product([8, 16, 32, 64], [128, 256, 512], [2, 4, 8]):
        kernels.GATE_UP_BLOCKS = dict(BLOCK_I=bi, BLOCK_H=bh, num_warps=nw)
        gu = kernels._blocks(kernels.GATE_UP_BLOCKS, BLOCK_I=I, BLOCK_H=H)
        fn = lambda: kernels._moe_gate_up_kernel[(K, -(-I // bi))](x, w1, slots, i_act, w1.stride(0), H=H, I=I, **gu)  # noqa: E731
        s = bench(fn)
        sweep["gate_up"].append({"BLOCK_I": bi, "BLOCK_H": bh, "num_warps": nw, "us": s * 1e6,
                                 "fraction_of_bound": K * 2 * I * H * 2 / hbm / s})
    out = torch.empty_like(x)
    for bh, bi, nw in itertools.product([4, 8, 16, 32], [128, 256, 512], [2, 4, 8]):
        kernels.DOWN_BLOCKS = dict(BLOCK_H=bh, BLOCK_I=bi, num_warps=nw)
        dn = kernels._blocks(kernels.DOWN_BLOCKS, BLOCK_H=H, BLOCK_I=I)
        fn = lambda: kernels._moe_down_kernel[(-(-H // bh),)](i_act, w2, slots, weights, x, out, w2.stride(0), K=K, H=H, I=I, HAS_RESID=True, **dn)  # noqa: E731
        s = bench(fn)
        sweep["down"].append({"BLOCK_H": bh, "BLOCK_I": bi, "num_warps": nw, "us": s * 1e6,
                              "fraction_of_bound": K * H * I * 2 / hbm / s})
    for k in sweep:
        sweep[k].sort(key=lambda r: r["us"])
    result["moe_tile_sweep_top5"] = {k: v[:5] for k, v in sweep.items()}
    best_gu, best_dn = sweep["gate_up"][0], sweep["down"][0]
    kernels.GATE_UP_BLOCKS = {k: best_gu[k] for k in ("BLOCK_I", "BLOCK_H", "num_warps")}
    kernels.DOWN_BLOCKS = {k: best_dn[k] for k in ("BLOCK_H", "BLOCK_I", "num_warps")}
    s = bench(lambda: kernels.moe(x, w1, w2, slots, weights, x))
    result["moe_fused_best_tiles"] = {"gate_up": kernels.GATE_UP_BLOCKS, "down": kernels.DOWN_BLOCKS, "us": s * 1e6,
                                      "fraction_of_bound": K * expert_bytes / hbm / s}

    # One whole layer as a CUDA graph, as the decode step replays it.
    def layer():
        h = kernels.rms_norm(x, norm_w, 1e-6)
        qq = kernels.qk_norm_rope_kv(F.linear(h, wqkv), qn, kn, cos, sin, pos, kc, vc, HEADS, KV, 1e-6)
        y = F.scaled_dot_product_attention(qq.view(1, HEADS, 1, D), kc, vc, attn_mask=mask, scale=D ** -0.5,
                                           enable_gqa=True)
        h2, r = kernels.rms_norm(x, norm_w, 1e-6, delta=F.linear(y.view(-1), wo))
        ti, tw, sl, _ = kernels.route(F.linear(h2, router), table, K, True)
        return kernels.moe(h2, w1, w2, sl, tw, r)

    layer()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(8):  # eight layers per replay, so the launch of the graph itself is amortised
            layer()
    s = bench(g.replay) / 8
    layer_bytes = wqkv.nbytes + wo.nbytes + router.nbytes + K * expert_bytes
    result["layer_graph"] = {"us": s * 1e6, "bytes": layer_bytes, "bound_us": layer_bytes / hbm * 1e6,
                             "fraction_of_bound": layer_bytes / hbm / s,
                             "sum_of_steps_us": sum(result["steps"][n]["us"] for n in (
                                 "rms_norm_add", "qkv_linear", "qk_norm_rope_kv", "attention_sdpa", "o_linear",
                                 "rms_norm_add", "router_linear", "route", "moe_fused"))}
    emit(result, a.out)


if __name__ == "__main__":
    main()
