"""What every generation run shares: where and how it ran, its decode rate and speed bound, how prompts
are encoded, and the checks on what it reads (files) and produces (finite logits)."""

from __future__ import annotations

import glob
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..resources import active_params, bytes_read_per_token, kv_bytes


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


def decode_rate(runs: list[dict]) -> float:
    tokens = sum(max(len(r["output_ids"]) - 1, 0) for r in runs)
    seconds = sum(r["decode_s"] for r in runs)
    return tokens / seconds if seconds > 0 else 0.0


def prefill_rate(runs: list[dict]) -> float:
    """Prompt tokens per second of prefill (time to first token), over all prompts."""
    tokens = sum(len(r["input_ids"]) for r in runs)
    seconds = sum(r["prefill_s"] for r in runs)
    return tokens / seconds if seconds > 0 else 0.0


def bandwidth_bytes_per_s(device: torch.device) -> float | None:
    """The device memory's peak bandwidth from its clock and bus width (DDR: two transfers a clock, the
    formula of torch.cuda._device_limits, which is private);
    None where unknown (CPU, or a torch without these properties)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up: first-touch page faults, thread pools, kernel selection
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _last_level_cache_bytes() -> int:
    try:
        sizes = [Path(p).read_text().strip() for p in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size")]
    except OSError:
        return 0
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return max((int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s) for s in sizes if s), default=0)


def read_bandwidth_probe(device: torch.device, reps: int = 5) -> dict:
    """Memory read rate measured here: a float32 sum over a tensor several times the last-level cache
    (256 MiB at least, so it streams from DRAM), median of reps; tens of milliseconds each."""
    size = max(256 * 2**20, 4 * _last_level_cache_bytes())
    x = torch.ones(size // 4, dtype=torch.float32, device=device)
    seconds = _median_seconds(x.sum, device, reps)
    del x
    return {"what": f"sum over {size / 2**20:.0f} MiB float32, median of {reps}", "bytes": size,
            "seconds": seconds, "bytes_per_second": size / seconds}


def matmul_probe(device: torch.device, dtype: torch.dtype, reps: int = 5) -> dict:
    """The rate this device multiplies at in the run's dtype: [n, n] x [n, n], median of reps (n = 1024 on
    the CPU, under 0.1 s a product on two cores; 8192 on a GPU, to fill its tensor cores)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    seconds = _median_seconds(lambda: a @ b, device, reps)
    del a, b
    return {"what": f"[{n}, {n}] x [{n}, {n}] {str(dtype).removeprefix('torch.')}, median of {reps}",
            "flops": 2 * n**3, "seconds": seconds, "flops_per_second": 2 * n**3 / seconds}


def probe(device: torch.device, dtype: torch.dtype) -> dict:
    """The rates the bounds divide by, measured in the job that timed the run (under a second on the
    CPU). The read rate is probed where the device's peak is not known (the CPU)."""
    probes = {"matmul": matmul_probe(device, dtype)}
    if bandwidth_bytes_per_s(device) is None:
        probes["read"] = read_bandwidth_probe(device)
    return probes


def kv_read_per_token(cfg, depth: int, runs: list[dict], dtype: torch.dtype) -> float:
    """The K and V one decoded token reads, averaged over the runs' decode steps: step j of a prompt of
    P tokens attends over P + j positions."""
    contexts = [len(r["input_ids"]) + j for r in runs for j in range(1, len(r["output_ids"]))]
    return kv_bytes(cfg, depth, sum(contexts), dtype) / len(contexts) if contexts else 0.0


def speed_bound(cfg, depth: int, dtype: torch.dtype, device: torch.device, runs: list[dict],
                probes: dict, expert_bytes: float | None = None) -> dict:
    """Decode tok/s can be no more than the read rate / bytes one token reads (its weights and the KV it
    attends over, batch 1); prefill tok/s no more than the matmul rate / 2 x active parameters (each
    prompt token multiplies by each active weight once; attention's T^2 terms left out)."""
    weights = bytes_read_per_token(cfg, depth, dtype, expert_bytes)
    kv = kv_read_per_token(cfg, depth, runs, dtype)
    peak = bandwidth_bytes_per_s(device)
    bandwidth = peak if peak is not None else probes["read"]["bytes_per_second"]
    flops_per_token = 2 * active_params(cfg, depth)
    matmul = probes["matmul"]["flops_per_second"]
    return {"weight_bytes_per_token": weights, "kv_bytes_per_token": kv, "bytes_read_per_token": weights + kv,
            "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_source": "device peak (memory clock x bus width)" if peak is not None
            else f"probed: {probes['read']['what']}",
            "tok_s_bound": bandwidth / (weights + kv),
            "prefill_flops_per_token": flops_per_token, "matmul_flops_per_s": matmul,
            "matmul_source": f"probed: {probes['matmul']['what']}",
            "prefill_tok_s_bound": matmul / flops_per_token}


def encode_prompt(tok, prompt: str, chat_template: bool | None) -> list[int]:
    """Token ids of a prompt: through the tokenizer's chat template (as a user turn, ready for the
    assistant's reply) when it has one and chat_template is not false; plain text otherwise."""
    has_template = bool(getattr(tok, "chat_template", None))
    if chat_template and not has_template:
        raise InputError("generate.chat_template is true but the checkpoint's tokenizer has no chat template")
    if has_template and chat_template is not False:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(prompt)["input_ids"]


def check_finite(logits: torch.Tensor, what: str) -> None:
    """NaN or inf logits make every fidelity number meaningless (and max() would hide a NaN): stop."""
    bad = ~torch.isfinite(logits)
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        raise InputError(f"{what}: logits hold NaN or inf (first at position {position}); fidelity and parity "
                         "cannot be measured")
