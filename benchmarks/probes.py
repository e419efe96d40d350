"""What the benchmarks measure the machine and a runtime with: peak memory of a phase, the GPU's read rate
(HBM), pinned host-to-device copies and zero-copy reads of pinned memory, each timed with CUDA events, and
the fewest bytes a decoded token reads. Imported by generate_speed.py and context_sweep.py; only torch
(and Triton on CUDA) is needed.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak memory of a phase: CUDA max allocated over what was allocated at the start, or on the host
    the kernel's RSS high-water mark (reset through clear_refs) over the RSS at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = _status_kb("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.resets = True
            except OSError:
                self.resets = False

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"kind": "cuda_max_allocated", "baseline_bytes": self.base, "peak_bytes": peak,
                    "peak_over_baseline_bytes": peak - self.base}
        peak = max(_status_kb("VmHWM"), _status_kb("VmRSS"))
        return {"kind": "rss_hwm" if self.resets else "rss_hwm_since_process_start", "baseline_bytes": self.base,
                "peak_bytes": peak, "peak_over_baseline_bytes": peak - self.base}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- the runs ---------------------------------------------------------------------------------------------

def cuda_median_seconds(fn, n: int, warmup: int) -> float:
    """Median seconds of n calls of fn on the GPU (CUDA events around each), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def hbm_probe(device, rows=1 << 19, cols=4096, dtype=torch.bfloat16) -> dict:
    """What a memory-bound decode can read per second here: a [rows, cols] matrix times a vector (4.3 GB
    of bf16 read once, far past L2), median of 20 timed products after warm-ups, by cuBLAS (torch.mv)
    and by the runtime's own Triton GEMV (whole rows: cols of a few thousand); the faster of the two is
    the bound (the stricter one)."""
    from moe_offload.runtime import kernels
    w = torch.randn(rows, cols, dtype=dtype, device=device)
    x = torch.randn(cols, dtype=dtype, device=device)
    rates = {"torch.mv": w.nbytes / cuda_median_seconds(lambda: torch.mv(w, x), 20, 3)}
    if kernels.available(w.device):
        rates["triton_gemv"] = w.nbytes / cuda_median_seconds(lambda: kernels.linear(x, w), 20, 3)
    del w
    free(device)
    best = max(rates, key=rates.get)
    what = (f"a [{rows}, {cols}] {str(dtype).replace('torch.', '')} matrix times a vector, median of 20, "
            f"the faster of {' and '.join(rates)}")
    return {"what": what, "bytes": rows * cols * 2, "seconds": rows * cols * 2 / rates[best],
            "bytes_per_second": rates[best], "bytes_per_second_each": rates}


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_blocks(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)))
except ImportError:  # the probe is for CUDA machines, which have Triton
    pass


def zero_copy_probe(device, nbytes=2**30, n=10) -> dict:
    """The GPU reading pinned host memory in place, as unified memory's kernels read experts: a Triton
    kernel summing a pinned buffer, each block its own partial sum (bf16 loads, 8 KiB per block)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    block = 4096
    out = torch.empty(triton.cdiv(src.numel(), block), dtype=torch.float32, device=device)
    s = cuda_median_seconds(lambda: _sum_blocks[(out.numel(),)](src, out, src.numel(), BLOCK=block), n, 2)
    assert out.sum().item() == src.numel()  # every element was read
    return {"what": f"a Triton kernel reading {nbytes} bytes of pinned host memory in place, median of {n}",
            "seconds": s, "bytes_per_second": nbytes / s}


def h2d_probe(device, nbytes: int, n=16, rounds=5) -> dict:
    """Pinned host -> device copies of one expert's bytes: what a cache miss costs at best. The best of
    `rounds` rounds of n copies (a bound is the link's best; one round has read 25% low on a busy host)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        per_round.append((time.perf_counter() - start) / n)
    s = min(per_round)
    return {"what": f"pinned host-to-device copies of {nbytes} bytes (one expert): best of {rounds} rounds of {n}",
            "seconds_per_copy": s, "bytes_per_second": nbytes / s,
            "rounds_bytes_per_second": [nbytes / t for t in per_round]}


def bytes_per_token(rt) -> int:
    """The fewest bytes one decoded token must read: every dense weight of the layers run (the embedding
    only its row), the top-k experts of each MoE layer, in the compute dtype. KV reads are left out (a
    few MB at these lengths)."""
    cfg, m = rt.config, rt.model
    total = m.norm.nbytes + m.lm_head.nbytes + m.embed[0].nbytes
    for block in m.layers:
        a = block.attn
        total += a.wqkv.nbytes + a.wo.nbytes + a.q_norm.nbytes + a.k_norm.nbytes + block.ln1.nbytes + block.ln2.nbytes
        if block.moe is not None:
            w1, w2, _ = rt.cache.slabs(block.mlp.layer)
            total += block.mlp.router.nbytes + cfg.experts_per_token * (w1[0].nbytes + w2[0].nbytes)
        else:
            total += block.mlp.gate.nbytes + block.mlp.up.nbytes + block.mlp.down.nbytes
    return total
