"""Where a long prompt's prefill spends its GPU time: ours and transformers' native model on the same
checkpoint and prompt, each under torch.profiler, their kernels side by side (milliseconds summed over
the prefill, the largest first) beside each side's wall time and the tensor-core bound measured here;
and the host's operations by their own CPU time (launches, syncs).

  PYTHONPATH=src python3 benchmarks/prefill_profile.py --layers 8 --experts 16 --length 8192 \
      --out benchmarks/results/prefill_profile_h100.json

--chunks 4096,16384 also times ours at other prompt-chunk sizes (cache_policy.PREFILL_CHUNK): a prompt
in one chunk attends on the causal kernel native uses; a later chunk attends after its prefix.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from moe_offload.analysis.run_info import matmul_probe  # noqa: E402
from moe_offload.checkpoint.dims import spec as dims_spec  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from moe_offload.resources import active_params  # noqa: E402
from moe_offload.runtime import cache_policy  # noqa: E402
from moe_offload.runtime.generate import load_runtime, prefill  # noqa: E402
from moe_offload.runtime.native import load_native  # noqa: E402
from common import emit  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() after one warm-up, the GPU drained around each call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def kernels(fn, top: int) -> dict:
    """fn() under the profiler: each CUDA kernel's total milliseconds and launches, the largest first."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    rows = [e for e in averages if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows) / 1e3
    # the host's side: where its time goes (a prefill whose kernels sum to less than its wall time waits on
    # the host: launches, syncs), by self CPU time
    host = sorted((e for e in averages if e.self_cpu_time_total > 0), key=lambda e: e.self_cpu_time_total,
                  reverse=True)
    return {"gpu_ms": total, "kernels": [{"name": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count,
                                          "share": e.device_time_total / 1e3 / total} for e in rows[:top]],
            "host_ms": sum(e.self_cpu_time_total for e in host) / 1e3,
            "host_ops": [{"name": e.key[:80], "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                         for e in host[:top]]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunks", default="", help="other prompt-chunk sizes to time ours at, comma-separated")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.set_grad_enabled(False)
    spec = dims_spec("real", a.layers, "qwen3_moe", num_experts=a.experts)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="prefill."))
    try:
        ex = build_and_extract(spec, work)
        cfg = ex.config
        rt = load_runtime(ex.dense, ex.dir, ex.ckpt, device="cuda", dtype=dtype, pin_memory=True)
        for layer, spans in rt.cache.spans.items():  # resident: every expert loaded before timing
            rt.cache.get_many(layer, list(range(len(spans))))
        rt.model.trace.enabled = False
        native = load_native(ex.ckpt, device, dtype)
        ids = torch.randint(16, cfg.vocab_size - 16, (1, a.length), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)

        def ours():
            rt.model.setup_caches(1, a.length + 1)
            prefill(rt.model, ids, a.length - 1)

        def theirs():
            native(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=True)

        matmul = matmul_probe(device, dtype)["flops_per_second"]
        bound = 2 * active_params(cfg, a.layers) * a.length / matmul
        result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
                  "device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "spec": spec,
                  "length": a.length, "matmul_flops_per_s": matmul, "tensor_core_bound_s": bound}
        for name, fn in (("ours", ours), ("native", theirs)):
            seconds = timed(fn, a.repeats)
            result[name] = {"prefill_s": seconds, "fraction_of_bound": bound / seconds, **kernels(fn, a.top)}
        result["prefill_speed_ours_over_native"] = result["native"]["prefill_s"] / result["ours"]["prefill_s"]
        result["prefill_chunk"], default_chunk = cache_policy.PREFILL_CHUNK, cache_policy.PREFILL_CHUNK
        result["ours_by_chunk"] = {}
        for chunk in [int(c) for c in a.chunks.split(",") if c]:
            cache_policy.PREFILL_CHUNK = chunk
            seconds = timed(ours, a.repeats)
            result["ours_by_chunk"][chunk] = {"prefill_s": seconds, "fraction_of_bound": bound / seconds,
                                              "speed_over_native": result["native"]["prefill_s"] / seconds}
        cache_policy.PREFILL_CHUNK = default_chunk
        emit(result, a.out)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
