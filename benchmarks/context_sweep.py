"""Prefill and decode across prompt lengths: ours and transformers' native model in one run, each next to
its bound measured in the same run.

For each prompt length (random token ids, seeded), after a warm-up at that length: time to first token
(prefill seconds) and decode tok/s of ours (greedy through the default path, and sampled at temperature 1)
and of native (transformers' generate, default experts implementation). Bounds:

  prefill  the tensor-core bound: 2 x active parameters x tokens / the bf16 matmul rate probed here
           (attention's T^2 work left out, as the issue defines it; `with_attention` adds it)
  decode   the HBM bound: (the weights a token reads + the KV cache it attends over) / the read rate
           probed here (the faster of cuBLAS and our GEMV, as generate_speed.py's probe)
  offload  with --capacity: also max(resident prefill, the missing experts' bytes / the link rate)

and, at the lengths asked (--fidelity), bf16 KL and top-1 agreement of our logits against native's on
native's continuation (teacher-forced, chunked).

  PYTHONPATH=src python3 benchmarks/context_sweep.py --dims real --layers 48 --experts 16 --device cuda \
      --lengths 36,2048,8192,32768 --out benchmarks/results/context_sweep_h100.json
  PYTHONPATH=src python3 benchmarks/context_sweep.py --dims tiny --layers 8 --device cpu --lengths 36,512,2048
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

from moe_offload.analysis.run_info import matmul_probe  # noqa: E402
from moe_offload.checkpoint.dims import DIMS, spec as dims_spec  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from moe_offload.resources import active_params, bytes_read_per_token, dtype_size, kv_bytes  # noqa: E402
from moe_offload.runtime import cache_policy  # noqa: E402
from moe_offload.runtime.generate import fidelity, generate, load_runtime, teacher_forced_logits  # noqa: E402
from moe_offload.runtime.native import load_native, native_generate  # noqa: E402
from common import emit, random_prompt  # noqa: E402
from probes import h2d_probe, hbm_probe, sync  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--layout", default="qwen3_moe", choices=["qwen3_omni_thinker", "qwen3_moe"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--lengths", default="36,2048,8192,32768")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--capacity", type=int, default=None, help="per-layer cache capacity with the host tier "
                   "(default: every expert resident)")
    p.add_argument("--fidelity", default="8192", help="lengths at which to compare logits with native's")
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per forward (default: the "
                   "runtime's, cache_policy.PREFILL_CHUNK)")
    a = p.parse_args()
    if a.prefill_chunk:
        cache_policy.PREFILL_CHUNK = a.prefill_chunk
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = [int(x) for x in a.lengths.split(",") if x]
    fid_lengths = {int(x) for x in a.fidelity.split(",") if x}
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = dims_spec(a.dims, a.layers, a.layout)
    if a.experts:
        spec["num_experts"] = a.experts
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sweep."))
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": a.device,
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype).replace("torch.", ""),
              "spec": spec, "new_tokens": a.new_tokens, "capacity": a.capacity,
              "prefill_chunk": cache_policy.PREFILL_CHUNK, "lengths": {}}
    try:
        t0 = time.perf_counter()
        ex = build_and_extract(spec, work)
        cfg = ex.config
        result["build_and_extract_seconds"] = time.perf_counter() - t0
        print(f"# built and extracted in {result['build_and_extract_seconds']:.0f} s", file=sys.stderr, flush=True)
        probes = {"matmul": matmul_probe(device, dtype)}
        if device.type == "cuda":
            probes["hbm"] = hbm_probe(device)
            probes["h2d"] = h2d_probe(device, cfg.expert_bytes)
        result["probes"] = probes
        rt = load_runtime(ex.dense, ex.dir, ex.ckpt, capacity=a.capacity, device=a.device, dtype=dtype, pin_memory=True,
                          host_tier=a.capacity is not None)
        if a.capacity is None:  # resident: every expert loaded before timing
            for layer, spans in rt.cache.spans.items():
                rt.cache.get_many(layer, list(range(len(spans))))
        rt.model.trace.enabled = False
        weights_per_token = bytes_read_per_token(cfg, a.layers, dtype)
        native = None if a.no_native else load_native(ex.ckpt, device, dtype)
        flops_per_token = 2 * active_params(cfg, a.layers)
        expert_bytes = cfg.expert_params * dtype_size(dtype)
        for n in lengths:
            ids = random_prompt(cfg.vocab_size, n, seed=n)
            row = {}
            for mode, kw in (("greedy", {}), ("sampled", dict(temperature=1.0, top_k=50, top_p=0.95))):
                generate(rt, ids, a.new_tokens, **kw)  # warm-up at this length: compiles, captures graphs
                runs = [generate(rt, ids, a.new_tokens, seed=i, **kw) for i in range(a.repeats)]
                row[f"ours_{mode}"] = {
                    "prefill_s": statistics.median(g.prefill_seconds for g in runs),
                    "decode_tok_s": statistics.median(g.decode_tokens_per_second for g in runs),
                    "prefill_misses": runs[-1].prefill_stats["misses"], "decode_hit_rate": runs[-1].decode_stats["hit_rate"],
                    "tokens": runs[-1].tokens[0]}
            if native is not None:
                native_generate(native, ids, a.new_tokens)
                nat = [native_generate(native, ids, a.new_tokens) for _ in range(a.repeats)]
                row["native"] = {"prefill_s": statistics.median(r["prefill_s"] for r in nat),
                                 "decode_tok_s": statistics.median(r["tok_s"] for r in nat), "tokens": nat[-1]["output_ids"]}
                row["greedy_tokens_identical"] = row["native"]["tokens"] == row["ours_greedy"]["tokens"]
                if n in fid_lengths:
                    cont = row["native"]["tokens"]
                    with torch.inference_mode():
                        full = torch.tensor([ids + cont], device=device)
                        theirs = native(input_ids=full, attention_mask=torch.ones_like(full),
                                        logits_to_keep=len(cont) + 1).logits[0, :-1].float().cpu()
                    row["fidelity_vs_native"] = fidelity(theirs, teacher_forced_logits(rt, ids, cont), cont)
            # bounds at this length
            prefill_bound = flops_per_token * n / probes["matmul"]["flops_per_second"]
            attn_flops = 4 * a.layers * cfg.num_heads * cfg.head_dim * n * n / 2  # causal QK^T and PV
            row["bound"] = {"prefill_tensor_core_s": prefill_bound,
                            "prefill_with_attention_s": prefill_bound + attn_flops / probes["matmul"]["flops_per_second"]}
            if "hbm" in probes:
                context = n + a.new_tokens // 2
                bytes_tok = weights_per_token + kv_bytes(cfg, a.layers, context, dtype)  # the KV it attends over
                row["bound"].update(decode_bytes_per_token=bytes_tok,
                                    decode_hbm_tok_s=probes["hbm"]["bytes_per_second"] / bytes_tok)
            if a.capacity is not None and "h2d" in probes:
                missing = row["ours_greedy"]["prefill_misses"] * expert_bytes
                row["bound"]["prefill_offload_s"] = max(prefill_bound, missing / probes["h2d"]["bytes_per_second"])
            b = row["bound"]
            for mode in ("ours_greedy", "ours_sampled", "native"):
                if mode in row:
                    r = row[mode]
                    r["prefill_fraction_of_tensor_core_bound"] = b["prefill_tensor_core_s"] / r["prefill_s"]
                    if "decode_hbm_tok_s" in b:
                        r["decode_fraction_of_hbm_bound"] = r["decode_tok_s"] / b["decode_hbm_tok_s"]
                    if "prefill_offload_s" in b:
                        r["prefill_over_offload_bound"] = r["prefill_s"] / b["prefill_offload_s"]
            if "native" in row:
                row["ratios"] = {"prefill_speed_ours_over_native": row["native"]["prefill_s"] / row["ours_greedy"]["prefill_s"],
                                 "decode_ours_over_native": row["ours_greedy"]["decode_tok_s"] / row["native"]["decode_tok_s"],
                                 "sampled_over_greedy": row["ours_sampled"]["decode_tok_s"] / row["ours_greedy"]["decode_tok_s"]}
            for r in row.values():
                if isinstance(r, dict):
                    r.pop("tokens", None)
            result["lengths"][str(n)] = row
            if a.out:  # what is measured so far survives a run cut short
                emit(result, a.out)
            print(f"# {n}: {row.get('ratios', row['ours_greedy'])}", file=sys.stderr, flush=True)
            sync(device)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    emit(result, a.out)


if __name__ == "__main__":
    main()
