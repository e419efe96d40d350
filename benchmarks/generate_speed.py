"""Decode speed of our selective-loading runtime against transformers' native model, in one run.

Builds a seeded synthetic checkpoint (tiny dims, or the real Qwen3-Omni thinker's expert dims), extracts
it, then on the same prompt ids and the same number of new tokens, each after a warm-up:

  ours, capacity = every expert (full cache; experts load on first use, the warm-up touches them)
  ours, capacity = top-k per layer (every token's experts read from the layer files)
  [cuda] ours, top-k, pinned staging buffer
  transformers native, default experts implementation, and eager

Prints one JSON object: tok/s (median of --repeats timed runs), ratios ours/native, per-layer per-token
ms and the 48-layer extrapolation, peak memory next to its bound (dense + capacity x expert + KV), a
parity line (greedy tokens identical to native, max |logit difference|), and on cuda the bounds
(speed_bounds.py) and, after every timed run, torch.profiler passes (speed_profiles.py). The runs
themselves are speed_runs.py's.

  PYTHONPATH=src python benchmarks/generate_speed.py --dims tiny --layers 48 --device cpu
  PYTHONPATH=src python3 benchmarks/generate_speed.py --dims real --layers 4 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

from moe_offload.checkpoint.dims import DIMS, REAL_LAYERS, spec as dims_spec  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from common import PROMPT, emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)
from probes import free, h2d_probe, hbm_probe, zero_copy_probe  # noqa: E402
from speed_bounds import bounds  # noqa: E402
from speed_profiles import run_profiles  # noqa: E402
from speed_runs import parity, run_native, run_ours  # noqa: E402


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
    a = p.parse_args()
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
        spec = dims_spec(a.dims, a.layers, a.layout)
        if a.experts:
            spec["num_experts"] = a.experts
        if a.embed_scale != 1:
            spec["embed_scale"] = a.embed_scale
        t0 = time.perf_counter()
        ex = build_and_extract(spec, work)
        ckpt, cfg = ex.ckpt, ex.config
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
        record(run_ours, a, ex, ids, None, label="ours_full", keep_logits=True)
        if device.type == "cuda":  # the same step as one graph per token, settled before the next launch
            record(run_ours, a, ex, ids, None, label="ours_full_graph", path="graph")
            record(run_ours, a, ex, ids, None, label="ours_full_torch", kernels=False)
        record(run_ours, a, ex, ids, None, label="ours_full_no_trace", trace=False)
        record(run_ours, a, ex, ids, k, label="ours_topk")
        if device.type == "cuda":
            record(run_ours, a, ex, ids, k, label="ours_topk_pinned", pin=True)
        for c in a.capacities:  # offloaded: misses read from the page cache (pinned staging) or the host tier
            record(run_ours, a, ex, ids, c, label=f"ours_cap{c}", pin=device.type == "cuda")
            record(run_ours, a, ex, ids, c, label=f"ours_cap{c}_host", pin=device.type == "cuda",
                   host_tier=True)  # with the kernels, misses read in place inside the step (device policy)
            record(run_ours, a, ex, ids, c, label=f"ours_cap{c}_host_copy", pin=device.type == "cuda",
                   host_tier=True, in_place=False)  # misses copied in by the host, the step redone
            record(run_ours, a, ex, ids, c, label=f"ours_cap{c}_host_prefetch", pin=device.type == "cuda",
                   host_tier=True, prefetch=True)
        if device.type == "cuda":  # every expert in pinned host RAM, read in place over the bus
            record(run_ours, a, ex, ids, None, label="ours_unified", unified=True)
        if a.recheck:  # the full cache again, last: shows how much the order of runs moves the figures
            record(run_ours, a, ex, ids, None, label="ours_full_repeat")
        record(run_native, a, ex, ids, "default", keep_logits=True)
        record(run_native, a, ex, ids, "eager", keep_logits=True)
        result["runs"] = runs
        if device.type == "cuda" and not a.no_profile:
            result["profiles"] = run_profiles(a, ex, ids)

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
        result[f"extrapolated_{REAL_LAYERS}_layer_tok_s"] = {l: 1000 / (ms * REAL_LAYERS)
                                                            for l, ms in result["per_layer_per_token_ms"].items()}
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
