"""What every generation run shares: where and how it ran, its decode rate and speed bound, how prompts
are encoded, and the checks on what it reads (files) and produces (finite logits)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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


def bandwidth_bytes_per_s(device: torch.device) -> float | None:
    """The device memory's peak bandwidth from its clock and bus width (DDR: two transfers a clock, the
    formula of torch.cuda._device_limits, which is private);
    None where unknown (CPU, or a torch without these properties)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def bytes_read_per_token(cfg, depth: int, dtype: torch.dtype) -> int:
    """Weights one decoded token must read at `depth` layers: attention, norms and routers of each layer,
    top-k experts (or the dense MLP) per layer, the final norm, lm_head and one embedding row."""
    h, hd, size = cfg.hidden_size, cfg.head_dim, dtype_bytes(dtype)
    attention = h * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 2 * hd + 2 * h
    params = 0
    for layer in range(depth):
        if cfg.has_experts(layer):
            params += attention + cfg.num_experts * h + cfg.experts_per_token * cfg.expert_params
        else:
            params += attention + 3 * h * cfg.intermediate_size
    params += h + cfg.vocab_size * h + h
    return params * size


def speed_bound(cfg, depth: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Decode tok/s can be no more than bandwidth / bytes read per token (batch 1)."""
    per_token = bytes_read_per_token(cfg, depth, dtype)
    bandwidth = bandwidth_bytes_per_s(device)
    return {"bytes_read_per_token": per_token, "bandwidth_bytes_per_s": bandwidth,
            "tok_s_bound": bandwidth / per_token if bandwidth else None}


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


def verify_files(files: list[tuple[Path, str, str]], progress=None) -> None:
    """Each (file, recorded xxh3-128, rule or file that redoes it) hashed once: a generation job uses no
    byte that validation did not see."""
    from ..hashing import hash_file

    for path, recorded, redo in files:
        try:
            actual = hash_file(path)
        except OSError as err:
            raise InputError(f"{path}: cannot be read ({err.strerror})") from None
        if actual != recorded:
            raise InputError(f"{path} does not match its recorded xxh3-128 (changed since validation); "
                             f"redo it with: snakemake --forcerun {redo}")
        if progress is not None:
            progress.update(1)
