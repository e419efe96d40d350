"""Where a decoded token's time goes on a GPU, for generate_speed.py: torch.profiler passes over our decode
and transformers' generate (GPU busy fraction, host syncs, kernel launches per token). Run after every
timed run: once torch.profiler has run with CUDA activity, later kernel launches in the process stay
slower (seen: native_default 227 tok/s unprofiled, 162 after a profile).
"""

from __future__ import annotations

import time

import torch

from moe_offload.runtime.decode import default_path
from moe_offload.runtime.generate import generate, load_runtime
from moe_offload.runtime.native import native_generate
from probes import free, sync
from speed_runs import load_native_model


def dev_time(e) -> float:
    """An event's own GPU microseconds (the attribute's name differs between torch versions)."""
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0


@torch.inference_mode()
def profile_decode(rt, ids, steps=8):
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
        "moe_layers": len(rt.config.expert_layers),
        "per_forward": {k: per_fwd(k) for k in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
                                                  "cudaStreamSynchronize", "aten::nonzero", "aten::index",
                                                  "aten::index_add_", "aten::mm", "aten::_local_scalar_dense")},
        "top_self_cpu_ops": [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                              "self_gpu_ms": dev_time(e) / 1000} for e in top_cpu],
        "top_gpu_ops": [{"op": e.key, "count": e.count, "self_gpu_ms": dev_time(e) / 1000} for e in top_gpu],
    }


def profile_native(model, ids, new_tokens=17):
    """transformers' generate() under torch.profiler (its prefill included): kernels and syncs per token."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = native_generate(model, ids, new_tokens)
    events = prof.key_averages()

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


def run_profiles(a, ex, ids) -> dict:
    """Our full and top-k caches (and --profile-capacities with the host tier) and native default, each
    profiled after the timed runs' warm-up; a case that fails says why in its place."""
    device, out = torch.device(a.device), {}
    cases = [("ours_full", None, False), ("ours_topk", ex.config.experts_per_token, False)]
    cases += [(f"ours_cap{c}_host", c, True) for c in a.profile_capacities]
    for label, cap, host in cases:
        try:
            rt = load_runtime(ex.dense, ex.dir, ex.ckpt, capacity=cap, device=a.device, dtype=a.dtype, host_tier=host,
                              pin_memory=True)
            generate(rt, ids, a.max_new_tokens)  # the same warm-up as the timed runs
            out[label] = profile_decode(rt, ids)
            rt.cache.close()
            del rt
        except Exception as err:
            out[label] = {"error": f"{type(err).__name__}: {err}"}
        free(device)
    try:
        model = load_native_model(ex.ckpt, device, a.dtype)
        native_generate(model, ids, 17)
        out["native_default"] = profile_native(model, ids)
        del model
    except Exception as err:
        out["native_default"] = {"error": f"{type(err).__name__}: {err}"}
    free(device)
    return out
