"""What every generation run records about where and how it ran, and its decode rate."""

from __future__ import annotations

import os
import platform

import torch

from ..errors import InputError
from ..runtime.memory import dtype_bytes


def device_of(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("generate.device is cuda but no CUDA device is available")
    return device


def use_threads(threads: int | None) -> int:
    """Set torch to the job's threads (its share of the machine: all cores for a timed job), never more
    than the cores this process may run on."""
    if threads:
        torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
    return torch.get_num_threads()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, dtype, torch's threads and the machine's load average (1, 5, 15 min) as the run starts:
    a timed run should find the machine idle."""
    env = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "host": platform.node(),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def kv_bytes(cfg, layers: int, seq_len: int, dtype: torch.dtype) -> int:
    return 2 * layers * cfg.num_kv_heads * seq_len * cfg.head_dim * dtype_bytes(dtype)


def decode_rate(runs: list[dict]) -> float:
    tokens = sum(max(len(r["output_ids"]) - 1, 0) for r in runs)
    seconds = sum(r["decode_s"] for r in runs)
    return tokens / seconds if seconds > 0 else 0.0
