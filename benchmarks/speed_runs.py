"""The timed runs generate_speed.py compares: ours (one runtime setting per run) and transformers' native
model, each loaded afresh, warmed up, then timed --repeats times on the same prompt ids; each with its peak
memory (the package's MemoryMeter) next to the bound the workflow declares (moe_offload.resources).
"""

from __future__ import annotations

import statistics
import time

import torch

from moe_offload.resources import bytes_read_per_token, depth_bytes, dtype_size
from moe_offload.runtime.decode import default_path
from moe_offload.runtime.fused_step import TRITON_OPS
from moe_offload.runtime.generate import generate, load_runtime
from moe_offload.runtime.memory import MemoryMeter
from moe_offload.runtime.native import load_native, native_generate
from probes import free


def run_ours(a, ex, ids, capacity, label, pin=False, trace=True, keep_logits=False, kernels=None,
             host_tier=False, path=None, unified=False, prefetch=False, in_place=None):
    """One setting of our runtime over ex (moe_offload.checkpoint.extracted.Extracted): (the run's figures,
    its tokens and, with keep_logits, logits for the parity check)."""
    device, cfg = torch.device(a.device), ex.config
    meter = MemoryMeter(device)
    t0 = time.perf_counter()
    rt = load_runtime(ex.dense, ex.dir, ex.ckpt, capacity=capacity, device=a.device, dtype=a.dtype, pin_memory=pin,
                      use_kernels=kernels, host_tier=host_tier, unified=unified, prefetch=prefetch,
                      in_place_misses=in_place)
    rt.model.trace.enabled = trace
    if capacity is None:  # the resident reference: every expert loaded before timing, none first touched later
        for layer, spans in rt.cache.spans.items():
            rt.cache.get_many(layer, list(range(len(spans))))
    load_s = time.perf_counter() - t0
    # --routing sampled: each run samples its own tokens (seed = run), so routing follows varied tokens
    sampling = dict(temperature=1.0) if a.routing == "sampled" else {}
    warm = generate(rt, ids, a.max_new_tokens, path=path, seed=a.repeats, **sampling)
    runs = [generate(rt, ids, a.max_new_tokens, path=path, seed=i, **sampling) for i in range(a.repeats)]
    mem = meter.end_phase("generate")
    toks = [g.decode_tokens_per_second for g in runs]
    # the pinned staging buffers are host memory, beside the device memory measured on a GPU
    bound = depth_bytes(cfg, cfg.num_layers, capacity, "per_layer", rt.dtype, len(ids) + a.max_new_tokens,
                        unified=unified)
    resident = rt.cache.resident_count()
    bound_resident = (bound["dense_bytes"] + resident * cfg.expert_params * dtype_size(rt.dtype)
                      + bound["kv_cache_bytes"])
    out = {
        "label": label, "capacity_per_layer": cfg.num_experts if capacity is None else capacity, "pin_memory": pin,
        "record_trace": trace, "decode_path": path or default_path(rt.step, 1),
        "host_tier_bytes": rt.cache.host_tier_bytes, "unified_memory": unified, "prefetch": prefetch,
        "in_place_misses": rt.step.in_place, "fused_kernels": rt.step.ops is TRITON_OPS,
        "bytes_per_token": bytes_read_per_token(cfg, cfg.num_layers, rt.dtype),
        "load_seconds": load_s, "warmup_tok_s": warm.decode_tokens_per_second,
        "tok_s": statistics.median(toks), "tok_s_runs": toks,
        "prefill_seconds": statistics.median(g.prefill_seconds for g in runs),
        "decode_stats_last_run": runs[-1].decode_stats,
        "resident_experts_at_end": resident,
        "memory": {**mem, "bound_bytes": bound["total_bytes"],
                   "bound_parts": {"dense": bound["dense_bytes"], "experts": bound["expert_cache_bytes"],
                                   "kv": bound["kv_cache_bytes"]},
                   "ratio_to_bound": mem["peak_over_baseline_bytes"] / bound["total_bytes"],
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


def load_native_model(ckpt, device, dtype, experts_implementation=None):
    model = load_native(ckpt, device, dtype, experts_implementation=experts_implementation)
    if not hasattr(model.config, "vision_start_token_id"):  # as tests/test_model_parity.py: 5.23's thinker lacks it
        model.config.vision_start_token_id = 151652
    return model


def run_native(a, ex, ids, impl, keep_logits=False):
    """transformers' model with experts implementation `impl` ("default" or one transformers names)."""
    device = torch.device(a.device)
    meter = MemoryMeter(device)
    t0 = time.perf_counter()
    model = load_native_model(ex.ckpt, device, a.dtype, None if impl == "default" else impl)
    load_s = time.perf_counter() - t0
    effective = getattr(model.config, "_experts_implementation", None)
    warm = native_generate(model, ids, a.max_new_tokens)
    runs = [native_generate(model, ids, a.max_new_tokens) for _ in range(a.repeats)]
    mem = meter.end_phase("generate")
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


def parity(ours: dict, native: dict) -> dict:
    """Greedy tokens and logits of ours against native's, from run_ours's and run_native's extras."""
    n = min(len(ours["logits"]), len(native["logits"]))
    d = (ours["logits"][:n] - native["logits"][:n]).abs()
    first_diff = next((i for i, (x, y) in enumerate(zip(ours["tokens"], native["tokens"])) if x != y), None)
    return {"greedy_tokens_identical": ours["tokens"] == native["tokens"], "first_differing_step": first_diff,
            "max_abs_logit_diff": d.max().item(), "max_abs_logit_diff_step0": d[0].max().item(),
            "logit_scale_max_abs": native["logits"][:n].abs().max().item(), "steps_compared": n}
