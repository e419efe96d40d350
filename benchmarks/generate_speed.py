"""Decode speed of our selective-loading runtime against transformers' native model, in one run.

Builds a seeded synthetic checkpoint (tiny dims, or the real Qwen3-Omni thinker's expert dims), extracts
it, then on the same prompt ids and the same number of new tokens, each after a warm-up:

  ours, capacity = every expert (full cache; experts load on first use, the warm-up touches them)
  ours, capacity = top-k per layer (every token's experts read from the layer files)
  [cuda] ours, top-k, pinned staging buffer
  transformers native, default experts implementation, and eager

Prints one JSON object: tok/s (median of --repeats timed runs), ratios ours/native, per-layer per-token
ms and the 48-layer extrapolation, peak memory next to its bound (dense + capacity x expert + KV), a
parity line (greedy tokens identical to native, max |logit difference|), and on cuda, after every timed
run, torch.profiler passes over our decode and native's generate (GPU busy fraction, host syncs, kernel
launches per token).

  PYTHONPATH=src python benchmarks/generate_speed.py --dims tiny --layers 48 --device cpu
  PYTHONPATH=src python3 benchmarks/generate_speed.py --dims real --layers 4 --device cuda --dtype bfloat16

Only torch, transformers, safetensors and tokenizers are imported (no psutil/pandas): it runs on the
GPU machine's stock python3 too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

from moe_offload.runtime.decode import default_path  # noqa: E402
from moe_offload.runtime.fused_step import TRITON_OPS  # noqa: E402
from moe_offload.runtime.generate import generate, load_runtime  # noqa: E402
from moe_offload.runtime.native import load_native, native_generate  # noqa: E402
from common import DIMS, build_and_extract, emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)
from probes import (Peak, bytes_per_token, cuda_median_seconds, free, h2d_probe, hbm_probe,  # noqa: E402
                    sync, zero_copy_probe)

PROMPT = ("The capital of France is Paris. Once upon a time there was a small robot who wanted to learn how "
          "to paint the sea.")


def run_ours(a, files, cfg, ids, capacity, label, pin=False, trace=True, keep_logits=False, kernels=None,
             host_tier=False, path=None, unified=False, prefetch=False, in_place=None):
    device = torch.device(a.device)
    peak = Peak(device)
    t0 = time.perf_counter()
    rt = load_runtime(files["dense"], files["dir"], files["ckpt"], capacity=capacity, device=a.device, dtype=a.dtype,
                      pin_memory=pin, use_kernels=kernels, host_tier=host_tier, unified=unified,
                      prefetch=prefetch, in_place_misses=in_place)
    rt.model.trace.enabled = trace
    if capacity is None:  # the resident reference: every expert loaded before timing, none first touched later
        for layer, spans in rt.cache.spans.items():
            rt.cache.get_many(layer, list(range(len(spans))))
    load_s = time.perf_counter() - t0
    # --routing sampled: each run samples its own tokens (seed = run), so routing follows varied tokens
    sampling = dict(temperature=1.0) if a.routing == "sampled" else {}
    warm = generate(rt, ids, a.max_new_tokens, path=path, seed=a.repeats, **sampling)
    runs = [generate(rt, ids, a.max_new_tokens, path=path, seed=i, **sampling) for i in range(a.repeats)]
    mem = peak.read()
    toks = [g.decode_tokens_per_second for g in runs]
    cap_per_layer = cfg.num_experts if capacity is None else capacity
    n_moe = len(cfg.expert_layers)
    dbytes = torch.empty((), dtype=rt.dtype).element_size()
    expert_bytes = cfg.expert_bytes // 2 * dbytes  # in the compute dtype
    seq = len(ids) + a.max_new_tokens
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * seq * dbytes
    bound = rt.dense_bytes + n_moe * cap_per_layer * expert_bytes + kv
    resident = rt.cache.resident_count()
    bound_resident = rt.dense_bytes + resident * expert_bytes + kv
    out = {
        "label": label, "capacity_per_layer": cap_per_layer, "pin_memory": pin, "record_trace": trace,
        "decode_path": path or default_path(rt.step, 1),
        "host_tier_bytes": rt.cache.host_tier_bytes, "unified_memory": unified, "prefetch": prefetch,
        "in_place_misses": rt.step.in_place,
        "fused_kernels": rt.step.ops is TRITON_OPS, "bytes_per_token": bytes_per_token(rt),
        "load_seconds": load_s, "warmup_tok_s": warm.decode_tokens_per_second,
        "tok_s": statistics.median(toks), "tok_s_runs": toks,
        "prefill_seconds": statistics.median(g.prefill_seconds for g in runs),
        "decode_stats_last_run": runs[-1].decode_stats,
        "resident_experts_at_end": resident,
        "memory": {**mem,
                   "bound_bytes": bound, "bound_parts": {"dense": rt.dense_bytes,
                                                         "experts": n_moe * cap_per_layer * expert_bytes, "kv": kv},
                   "ratio_to_bound": mem["peak_over_baseline_bytes"] / bound,
                   "bound_with_resident_experts_bytes": bound_resident,
                   "ratio_to_bound_with_resident_experts": mem["peak_over_baseline_bytes"] / bound_resident},
    }
    s = runs[-1].decode_stats
    if s["misses"]:
        out["decode_ms_per_miss"] = 1000 * s["load_seconds"] / s["misses"]
        out["decode_load_fraction"] = s["load_seconds"] / runs[-1].decode_seconds
    tokens = runs[-1].tokens[0]
    if a.routing == "greedy":
        out["tokens_stable_across_runs"] = all(g.tokens[0] == tokens for g in runs + [warm])
    extra = {"tokens": tokens}
    if keep_logits:
        g = generate(rt, ids, a.max_new_tokens, return_logits=True, path=path)
        extra["logits"] = torch.stack([l[0] for l in g.logits])
    rt.cache.close()
    del rt, warm, runs
    free(device)
    return out, extra


@torch.inference_mode()
def profile_decode(rt, ids, cfg, steps=8):
    """Decode forwards alone (after a prefill, every expert they use already resident when the cache holds
    them all), timed plainly and then under torch.profiler: where a decoded token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    model, dev = rt.model, rt.device
    x = torch.as_tensor([ids], device=dev)
    t = x.shape[1]

    def decode(profiled=False):
        model.setup_caches(1, t + steps + 1)
        tok = model.forward(x, torch.arange(t, device=dev))[:, -1].argmax(-1)
        sync(dev)
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if profiled else None
        if prof:
            prof.__enter__()
        start = time.perf_counter()
        decoder = rt.decoder(default_path(rt.step, 1))
        for s in range(steps):
            _, tok, _ = decoder.step(tok, t + s, last=s + 1 == steps)
        decoder.flush()
        sync(dev)
        seconds = time.perf_counter() - start
        if prof:
            prof.__exit__(None, None, None)
        return seconds, prof

    decode()
    plain_s, _ = decode()
    profiled_s, prof = decode(profiled=True)
    events = prof.key_averages()

    def dev_time(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    total_dev_us = sum(dev_time(e) for e in events)
    by_name = {e.key: e for e in events}
    forwards = steps

    def per_fwd(name):
        return by_name[name].count / forwards if name in by_name else 0

    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top_gpu = sorted(events, key=dev_time, reverse=True)[:8]
    return {
        "note": f"{steps} decode forwards (batch 1) after an unprofiled prefill; counts per decode forward; "
                "gpu_busy = summed kernel time over the profiled loop's wall time (profiling slows the host side)",
        "decode_ms_per_token_plain": 1000 * plain_s / steps,
        "decode_ms_per_token_profiled": 1000 * profiled_s / steps,
        "gpu_kernel_ms_total": total_dev_us / 1000,
        "gpu_busy_fraction_approx": total_dev_us / 1e6 / profiled_s,
        "moe_layers": len(cfg.expert_layers),
        "per_forward": {k: per_fwd(k) for k in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
                                                  "cudaStreamSynchronize", "aten::nonzero", "aten::index",
                                                  "aten::index_add_", "aten::mm", "aten::_local_scalar_dense")},
        "top_self_cpu_ops": [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                              "self_gpu_ms": dev_time(e) / 1000} for e in top_cpu],
        "top_gpu_ops": [{"op": e.key, "count": e.count, "self_gpu_ms": dev_time(e) / 1000} for e in top_gpu],
    }


def run_native(a, files, ids, impl, keep_logits=False):
    device = torch.device(a.device)
    peak = Peak(device)
    t0 = time.perf_counter()
    model = load_native(files["ckpt"], device, a.dtype, experts_implementation=None if impl == "default" else impl)
    if not hasattr(model.config, "vision_start_token_id"):  # as tests/test_model_parity.py: 5.23's thinker lacks it
        model.config.vision_start_token_id = 151652
    load_s = time.perf_counter() - t0
    effective = getattr(model.config, "_experts_implementation", None)
    warm = native_generate(model, ids, a.max_new_tokens)
    runs = [native_generate(model, ids, a.max_new_tokens) for _ in range(a.repeats)]
    mem = peak.read()
    toks = [r["tok_s"] for r in runs]
    out = {"label": f"native_{impl}", "experts_implementation": effective, "load_seconds": load_s,
           "warmup_tok_s": warm["tok_s"], "tok_s": statistics.median(toks), "tok_s_runs": toks,
           "prefill_seconds": statistics.median(r["prefill_s"] for r in runs), "memory": mem,
           "new_tokens": len(runs[-1]["output_ids"])}
    extra = {"tokens": runs[-1]["output_ids"]}
    if keep_logits:
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new_tokens,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
        extra["logits"] = torch.stack([l[0].float().cpu() for l in g.logits])
        extra["tokens_logits_run"] = g.sequences[0, len(ids):].tolist()
    del model
    free(device)
    return out, extra


def profile_native(model, ids, new_tokens=17):
    """transformers' generate() under torch.profiler (its prefill included): kernels and syncs per token."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = native_generate(model, ids, new_tokens)
    events = prof.key_averages()

    def dev_time(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    by_name = {e.key: e for e in events}
    n = new_tokens
    wall = r["prefill_s"] + r["decode_s"]
    return {"note": f"one generate() of {n} tokens (prefill included) under torch.profiler; counts per token",
            "gpu_kernel_ms_total": sum(dev_time(e) for e in events) / 1000, "wall_ms_profiled": 1000 * wall,
            "gpu_busy_fraction_approx": sum(dev_time(e) for e in events) / 1e6 / wall,
            "per_token": {k: by_name[k].count / n if k in by_name else 0 for k in
                          ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync", "cudaStreamSynchronize",
                           "aten::nonzero", "aten::mm", "aten::_grouped_mm", "aten::_local_scalar_dense")},
            "top_gpu_ops": [{"op": e.key[:80], "count": e.count, "self_gpu_ms": dev_time(e) / 1000}
                            for e in sorted(events, key=dev_time, reverse=True)[:8]]}


def run_profiles(a, files, cfg, ids) -> dict:
    """After every timed run: once torch.profiler has run with CUDA activity, later kernel launches in the
    process stay slower (seen here: native_default 227 tok/s unprofiled, 162 after a profile), so no
    figure is timed after one."""
    device, out = torch.device(a.device), {}
    cases = [("ours_full", None, False), ("ours_topk", cfg.experts_per_token, False)]
    cases += [(f"ours_cap{c}_host", c, True) for c in a.profile_capacities]
    for label, cap, host in cases:
        try:
            rt = load_runtime(files["dense"], files["dir"], files["ckpt"], capacity=cap, device=a.device, dtype=a.dtype,
                              host_tier=host, pin_memory=True)
            generate(rt, ids, a.max_new_tokens)  # the same warm-up as the timed runs
            out[label] = profile_decode(rt, ids, cfg)
            rt.cache.close()
            del rt
        except Exception as err:
            out[label] = {"error": f"{type(err).__name__}: {err}"}
        free(device)
    try:
        model = load_native(files["ckpt"], device, a.dtype)
        if not hasattr(model.config, "vision_start_token_id"):
            model.config.vision_start_token_id = 151652
        native_generate(model, ids, 17)
        out["native_default"] = profile_native(model, ids)
        del model
    except Exception as err:
        out["native_default"] = {"error": f"{type(err).__name__}: {err}"}
    free(device)
    return out


def parity(ours: dict, native: dict) -> dict:
    n = min(len(ours["logits"]), len(native["logits"]))
    d = (ours["logits"][:n] - native["logits"][:n]).abs()
    first_diff = next((i for i, (x, y) in enumerate(zip(ours["tokens"], native["tokens"])) if x != y), None)
    return {"greedy_tokens_identical": ours["tokens"] == native["tokens"], "first_differing_step": first_diff,
            "max_abs_logit_diff": d.max().item(), "max_abs_logit_diff_step0": d[0].max().item(),
            "logit_scale_max_abs": native["logits"][:n].abs().max().item(), "steps_compared": n}


def bounds(result: dict) -> dict:
    """Each run of ours against the bound measured in the same run, from the result's own fields only (so
    `--recompute` can apply these definitions to a stored result).

    Resident: bytes per token over the HBM probe. Offloaded: the resident step (ours_full's time) plus
    each miss's bytes over the link, with the rate of the way the run moves them (pinned DMA copies, or
    for in-place misses the kernels' reads of pinned RAM: the zero-copy probe); and, where transfers run
    while the GPU computes (in-place misses, prefetch), also the larger of the two instead of their sum
    (overlap bound), which no run can beat.
    """
    runs, spec = result["runs"], result["spec"]
    bw = result["hbm_probe"]["bytes_per_second"]
    h2d = result["h2d_probe"]["bytes_per_second"]
    zero_copy = result.get("zero_copy_probe", {}).get("bytes_per_second")
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[result["dtype"]]
    expert_bytes = result["expert_bytes_bf16"] // 2 * itemsize
    k, n_moe = spec["experts_per_token"], spec["num_layers"] - len(spec.get("mlp_only_layers", []))
    steps = max(result["max_new_tokens"] - 1, 1)
    resident_s = 1 / runs["ours_full"]["tok_s"] if runs.get("ours_full", {}).get("tok_s") else None
    out = {}
    for label, r in runs.items():
        if "bytes_per_token" not in r:
            continue
        s = r["decode_stats_last_run"]
        misses = s["misses"] / steps
        entry = {"hbm_bound_tok_s": bw / r["bytes_per_token"], "misses_per_token": misses, "hit_rate": s["hit_rate"]}
        if r.get("unified_memory"):  # the routed experts read in place over the bus, the rest from HBM
            over_bus = n_moe * k * expert_bytes
            entry["unified_bound_tok_s"] = 1 / ((r["bytes_per_token"] - over_bus) / bw + over_bus / zero_copy)
            entry["fraction_of_unified_bound"] = r["tok_s"] / entry["unified_bound_tok_s"]
        elif misses == 0:
            entry["fraction_of_hbm_bound"] = r["tok_s"] / entry["hbm_bound_tok_s"]
        elif resident_s:
            used = s["prefetch_used"] / steps if r.get("prefetch") else 0.0  # misses the lookahead hid
            if r.get("prefetch"):
                entry.update(misses_hidden_per_token=used, prefetched_per_token=s["prefetched"] / steps,
                             prefetch_precision=s["prefetch_used"] / s["prefetched"] if s["prefetched"] else None,
                             prefetch_recall=used / (used + misses) if used + misses else None)
            link = zero_copy if r.get("in_place_misses") and zero_copy else h2d
            transfers = (misses + used) * expert_bytes / link
            entry.update(link="zero-copy reads" if link is not h2d else "pinned DMA copies", link_bytes_per_second=link,
                         offload_bound_tok_s=1 / (resident_s + transfers))
            if r.get("prefetch"):  # as the issue defines it with prefetch: the larger of the two
                entry["offload_bound_tok_s"] = 1 / max(resident_s, transfers)
            entry["fraction_of_offload_bound"] = r["tok_s"] / entry["offload_bound_tok_s"]
            if r.get("in_place_misses") or r.get("prefetch"):
                entry["overlap_bound_tok_s"] = 1 / max(resident_s, transfers)
                entry["fraction_of_overlap_bound"] = r["tok_s"] / entry["overlap_bound_tok_s"]
        out[label] = entry
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="default: 48 tiny, 4 real")
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: the dims' own)")
    p.add_argument("--layout", default="qwen3_omni_thinker", choices=["qwen3_omni_thinker", "qwen3_moe"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 cpu, 64 cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the checkpoint and extracted files go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-profile", action="store_true", help="cuda: skip the torch.profiler pass (run after all timings)")
    p.add_argument("--routing", choices=["greedy", "sampled"], default="greedy",
                   help="sampled: ours decode by sampling at temperature 1, so consecutive tokens differ (greedy "
                        "decoding of a random-weight model repeats tokens: far more reuse than a real model's routing)")
    p.add_argument("--embed-scale", type=float, default=1.0,
                   help="token embeddings scaled by this in the checkpoint built, so routing follows the token")
    p.add_argument("--profile-capacities", default="", help="cuda: also profile these capacities with the host tier")
    p.add_argument("--only", default=None, help="comma-separated run labels to do (default: all)")
    p.add_argument("--recheck", action="store_true", help="run ours_full once more after the other runs of ours")
    p.add_argument("--capacities", default="", help="comma-separated per-layer capacities to run offloaded, "
                   "each with and without the host tier (labels ours_cap{C}, ours_cap{C}_host; _host_copy: the "
                   "host tier without in-place misses; _host_prefetch: with router lookahead)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--recompute", default=None, metavar="JSON",
                   help="only recompute a stored result's bounds with this script's definitions (rewrites the file)")
    a = p.parse_args()
    if a.recompute:
        result = json.loads(Path(a.recompute).read_text())
        result["bound"] = bounds(result)
        result["bound_recomputed_by"] = " ".join([Path(sys.executable).name] + sys.argv)
        Path(a.recompute).write_text(json.dumps(result, indent=1) + "\n")
        return
    a.layers = a.layers or (48 if a.dims == "tiny" else 4)
    a.capacities = [int(c) for c in a.capacities.split(",") if c]
    a.profile_capacities = [int(c) for c in a.profile_capacities.split(",") if c]
    a.dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    a.max_new_tokens = a.max_new_tokens or (64 if a.device.startswith("cuda") else 32)
    device = torch.device(a.device)
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="genspeed."))
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": a.device,
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": str(a.dtype).replace("torch.", ""), "dims": a.dims, "layers": a.layers, "layout": a.layout,
              "max_new_tokens": a.max_new_tokens, "repeats": a.repeats, "routing": a.routing}
    try:
        spec = dict(DIMS[a.dims], layout=a.layout, num_layers=a.layers, seed=0, mlp_only_layers=[])
        if a.experts:
            spec["num_experts"] = a.experts
        if a.embed_scale != 1:
            spec["embed_scale"] = a.embed_scale
        t0 = time.perf_counter()
        files, cfg = build_and_extract(spec, work)
        ckpt = files["ckpt"]
        t1 = time.perf_counter()
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(ckpt)(PROMPT).input_ids
        result.update(spec={k: v for k, v in spec.items()}, build_and_extract_seconds=t1 - t0,
                      prompt_tokens=len(ids), expert_bytes_bf16=cfg.expert_bytes,
                      checkpoint_bytes=sum(f.stat().st_size for f in ckpt.glob("*.safetensors")))
        print(f"# built and extracted in {t1 - t0:.1f}s, prompt {len(ids)} tokens", file=sys.stderr, flush=True)

        runs, extras = {}, {}

        def record(fn, *args, **kw):
            label = kw.get("label") or f"native_{args[3]}"
            if a.only and label not in a.only.split(","):
                return
            try:
                r, e = fn(*args, **kw)
                runs[r["label"]], extras[r["label"]] = r, e
                print(f"# {r['label']}: {r['tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
            except Exception as err:  # keep the other figures; say what broke
                label = kw.get("label") or f"native_{args[3]}"
                runs[str(label)] = {"error": f"{type(err).__name__}: {err}"}
                print(f"# {label}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                free(device)

        k = cfg.experts_per_token
        if device.type == "cuda":
            result["hbm_probe"] = hbm_probe(device)
            result["h2d_probe"] = h2d_probe(device, cfg.expert_bytes)
            result["zero_copy_probe"] = zero_copy_probe(device)
        record(run_ours, a, files, cfg, ids, None, label="ours_full", keep_logits=True)
        if device.type == "cuda":  # the same step as one graph per token, settled before the next launch
            record(run_ours, a, files, cfg, ids, None, label="ours_full_graph", path="graph")
            record(run_ours, a, files, cfg, ids, None, label="ours_full_torch", kernels=False)
        record(run_ours, a, files, cfg, ids, None, label="ours_full_no_trace", trace=False)
        record(run_ours, a, files, cfg, ids, k, label="ours_topk")
        if device.type == "cuda":
            record(run_ours, a, files, cfg, ids, k, label="ours_topk_pinned", pin=True)
        for c in a.capacities:  # offloaded: misses read from the page cache (pinned staging) or the host tier
            record(run_ours, a, files, cfg, ids, c, label=f"ours_cap{c}", pin=device.type == "cuda")
            record(run_ours, a, files, cfg, ids, c, label=f"ours_cap{c}_host", pin=device.type == "cuda",
                   host_tier=True)  # with the kernels, misses read in place inside the step (device policy)
            record(run_ours, a, files, cfg, ids, c, label=f"ours_cap{c}_host_copy", pin=device.type == "cuda",
                   host_tier=True, in_place=False)  # misses copied in by the host, the step redone
            record(run_ours, a, files, cfg, ids, c, label=f"ours_cap{c}_host_prefetch", pin=device.type == "cuda",
                   host_tier=True, prefetch=True)
        if device.type == "cuda":  # every expert in pinned host RAM, read in place over the bus
            record(run_ours, a, files, cfg, ids, None, label="ours_unified", unified=True)
        if a.recheck:  # the full cache again, last: shows how much the order of runs moves the figures
            record(run_ours, a, files, cfg, ids, None, label="ours_full_repeat")
        record(run_native, a, files, ids, "default", keep_logits=True)
        record(run_native, a, files, ids, "eager", keep_logits=True)
        result["runs"] = runs
        if device.type == "cuda" and not a.no_profile:
            result["profiles"] = run_profiles(a, files, cfg, ids)

        def tok(label):
            return runs.get(label, {}).get("tok_s")

        if "hbm_probe" in result:
            result["bound"] = bounds(result)
        ratios = {}
        for o in [label for label in runs if label.startswith("ours_")]:
            for n in ("native_default", "native_eager"):
                if tok(o) and tok(n):
                    ratios[f"{o}/{n}"] = tok(o) / tok(n)
        result["ratios"] = ratios
        result["per_layer_per_token_ms"] = {l: 1000 / tok(l) / a.layers for l in runs if tok(l)}
        result["extrapolated_48_layer_tok_s"] = {l: 1000 / (ms * 48) for l, ms in result["per_layer_per_token_ms"].items()}
        result["memory_ratio_to_bound"] = {l: r["memory"]["ratio_to_bound"] for l, r in runs.items()
                                           if "memory" in r and "ratio_to_bound" in r["memory"]}
        par = {}
        for n in ("native_default", "native_eager") if a.routing == "greedy" else ():  # sampled: other tokens
            if "logits" in extras.get("ours_full", {}) and "logits" in extras.get(n, {}):
                par[f"ours_full_vs_{n}"] = parity(extras["ours_full"], extras[n])
        if "tokens" in extras.get("ours_topk", {}) and "tokens" in extras.get("ours_full", {}):
            par["ours_topk_tokens_equal_ours_full"] = extras["ours_topk"]["tokens"] == extras["ours_full"]["tokens"]
        par["dtype"] = result["dtype"]
        result["parity"] = par
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_1_5_15_at_end"] = list(os.getloadavg())  # other processes on the machine add noise
    emit(result, a.out)


if __name__ == "__main__":
    main()
