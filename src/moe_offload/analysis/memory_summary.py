"""A run's memory as the report and the plots show it. A module of its own, shared by both, so that a
change to the comparison report does not redraw the plots (moe_offload.code_version)."""

from __future__ import annotations


def memory_summary(run: dict) -> dict:
    """The model's own memory (peak during a phase minus the process's baseline, taken after imports and
    a warm-up), its bound, and apart from both what the framework added before the model was loaded."""
    mem = run["memory"]
    gen, load = mem.get("generate", {}), mem.get("load", {})
    on_gpu = "cuda_max_allocated_bytes" in gen
    key = "cuda_max_allocated_bytes" if on_gpu else "peak_rss_bytes"
    base = 0 if on_gpu else mem["baseline_rss_bytes"]
    bound = mem["bound"]["total_bytes"]
    model = gen.get(key, base) - base
    return {"measure": "cuda_max_allocated" if on_gpu else "rss_over_baseline",
            "load_peak_bytes": load.get(key, base) - base,
            "generate_peak_bytes": model,
            "bound_bytes": bound,
            "bound_parts": {k: v for k, v in mem["bound"].items() if k != "total_bytes"},
            "generate_peak_to_bound": model / bound if bound else None,
            "framework_overhead_bytes": mem.get("framework_overhead_bytes")}
