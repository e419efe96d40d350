"""What the benchmarks measure a GPU machine with: the GPU's read rate (HBM), pinned host-to-device copies
and zero-copy reads of pinned memory. Imported by generate_speed.py and context_sweep.py; torch and
Triton (which every CUDA machine here has). Peak memory is the package's MemoryMeter, the bytes a token
reads moe_offload.resources.bytes_read_per_token, and the CPU's rates analysis.run_info's probes.
"""

from __future__ import annotations

import gc
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def median_seconds(fn) -> float:
    """Median seconds of fn on the GPU, by Triton's own benchmark loop (CUDA events around each call, L2
    cleared before it, 200 ms of calls after 25 ms of warm-up)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1000


def hbm_probe(device, rows=1 << 19, cols=4096, dtype=torch.bfloat16) -> dict:
    """What a memory-bound decode can read per second here: a [rows, cols] matrix times a vector (4.3 GB
    of bf16 read once, far past L2), the median product (median_seconds), by cuBLAS (torch.mv)
    and by the runtime's own Triton GEMV (whole rows: cols of a few thousand); the faster of the two is
    the bound (the stricter one)."""
    from moe_offload.runtime import kernels
    w = torch.randn(rows, cols, dtype=dtype, device=device)
    x = torch.randn(cols, dtype=dtype, device=device)
    rates = {"torch.mv": w.nbytes / median_seconds(lambda: torch.mv(w, x))}
    if kernels.available(w.device):
        rates["triton_gemv"] = w.nbytes / median_seconds(lambda: kernels.linear(x, w))
    del w
    free(device)
    best = max(rates, key=rates.get)
    what = (f"a [{rows}, {cols}] {str(dtype).replace('torch.', '')} matrix times a vector, median by do_bench, "
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


def zero_copy_probe(device, nbytes=2**30) -> dict:
    """The GPU reading pinned host memory in place, as unified memory's kernels read experts: a Triton
    kernel summing a pinned buffer, each block its own partial sum (bf16 loads, 8 KiB per block)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    block = 4096
    out = torch.empty(triton.cdiv(src.numel(), block), dtype=torch.float32, device=device)
    s = median_seconds(lambda: _sum_blocks[(out.numel(),)](src, out, src.numel(), BLOCK=block))
    assert out.sum().item() == src.numel()  # every element was read
    return {"what": f"a Triton kernel reading {nbytes} bytes of pinned host memory in place, median by do_bench",
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
