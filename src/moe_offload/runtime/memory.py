"""Memory measured from inside the process, next to the bound it should be compared with.

Host: resident set size, with the kernel's high-water mark reset after loading (Linux clear_refs) so
the generation peak is not the loading peak. GPU: torch's max allocated bytes, reset the same way.
"""

from __future__ import annotations

import gc
from pathlib import Path

import psutil
import torch


def _hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _warm_up() -> None:
    """Touch the kernels and thread pools every run uses, so their one-time allocations count as the
    framework's, not the model's."""
    x = torch.randn(64, 64)
    torch.nn.functional.silu(x @ x).softmax(-1).topk(4, dim=-1)


class MemoryMeter:
    """start_rss: the process's RSS before torch and transformers were imported (steps.run_step measures
    it); the baseline is taken after imports and a warm-up, and the model's memory is measured from it.
    On a GPU the baseline is what torch has allocated there when the meter starts: a benchmark that
    measures several runs in one process starts a meter per run, after freeing the last one's tensors."""

    def __init__(self, device: torch.device, start_rss: int | None = None):
        self.device = device
        self.start_rss = start_rss
        _warm_up()
        gc.collect()  # a previous run's tensors, unreachable but not yet freed, are not this baseline's
        self.baseline_rss = psutil.Process().memory_info().rss
        self.baseline_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self.phases: dict[str, dict] = {}
        self._reset()

    def _reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm_resets = True
        except OSError:
            self._hwm_resets = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_phase(self, name: str) -> dict:
        """Record and return the peak since the last phase ended (or since the process started, where the
        kernel cannot reset its high-water mark: `peak_is_since_start` says so). peak_over_baseline_bytes
        is the device's: torch's max allocated on a GPU, the RSS on the CPU."""
        rss = psutil.Process().memory_info().rss
        phase = {"peak_rss_bytes": max(_hwm() or rss, rss), "rss_bytes": rss,
                 "peak_is_since_start": not self._hwm_resets}
        phase["peak_over_baseline_bytes"] = phase["peak_rss_bytes"] - self.baseline_rss
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            phase["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            phase["peak_over_baseline_bytes"] = phase["cuda_max_allocated_bytes"] - self.baseline_cuda
        self.phases[name] = phase
        self._reset()
        return phase

    def report(self, bound: dict | None = None) -> dict:
        overhead = self.baseline_rss - self.start_rss if self.start_rss is not None else None
        out = {"start_rss_bytes": self.start_rss, "baseline_rss_bytes": self.baseline_rss,
               "framework_overhead_bytes": overhead, **{f"{k}": v for k, v in self.phases.items()}}
        if bound is not None:
            out["bound"] = bound
            used = self.phases.get("generate", {}).get("peak_over_baseline_bytes", 0)
            out["generate_peak_over_baseline_bytes"] = used
            out["ratio_to_bound"] = used / bound["total_bytes"] if bound.get("total_bytes") else None
        return out
