"""One selective generation run as the workflow records it: ours at a depth (native runs: native_runs.py).

Both write the same JSON shape: `prompts` ({prompt, input_ids, output_ids, text}), load_s, decode tok/s
(prefill apart), peak memory next to its bound, and the device. Depth runs add the cache counters,
fidelity against native (teacher-forced on native's tokens) and a router trace for cache profiling.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ..atomic import atomic_path, write_json
from ..errors import InputError
from ..runtime.memory import MemoryMeter, dtype_bytes
from .run_info import decode_rate, device_of, environment, kv_bytes


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
    from ..checkpoint.validate import hash_file

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



def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def host_tier_on(setting, layer_files: dict[int, Path]) -> bool:
    """The host tier's `auto`: on when every expert file of the run fits in half the RAM available now."""
    if setting != "auto":
        return bool(setting)
    need = sum(Path(p).stat().st_size for p in layer_files.values())
    return need <= psutil.virtual_memory().available // 2


def run_depth(checkpoint_dir, dense_path, layer_files: dict[int, Path], depth: int, cache: dict, device: str,
              dtype: str, max_new_tokens: int, native_json: dict, native_logits_path, out_json, out_trace,
              progress=None, start_rss: int | None = None) -> dict:
    from ..runtime.generate import fidelity, generate, load_runtime, teacher_forced_logits
    from ..runtime.model import TRACE_COLUMNS

    device, torch_dtype = device_of(device), getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    meter = MemoryMeter(device, start_rss)
    start = time.perf_counter()
    rt = load_runtime(dense_path, layer_files, checkpoint_dir, depth=depth, capacity=cache["capacity"],
                      scope=cache["scope"], policy=cache["policy"], device=str(device), dtype=torch_dtype,
                      pin_memory=cache.get("pin_memory", False), side_stream=cache.get("side_stream", False),
                      host_tier=host_tier_on(cache.get("host_tier", False), layer_files),
                      use_kernels=cache.get("fused_kernels"))
    load_s = time.perf_counter() - start
    meter.end_phase("load")
    runs, prefill_stats, decode_stats = [], [], []
    for i, ref in enumerate(native_json["prompts"]):
        # the very input ids native used, so both sides see the same tokens
        g = generate(rt, ref["input_ids"], max_new_tokens, eos_token_id=tok.eos_token_id, prompt=i)
        out = g.tokens[0]
        runs.append({"prompt": ref["prompt"], "input_ids": ref["input_ids"], "output_ids": out,
                     "text": tok.decode(out, skip_special_tokens=True), "prefill_s": g.prefill_seconds,
                     "decode_s": g.decode_seconds, "tok_s": g.decode_tokens_per_second,
                     "tokens_identical_to_native": out == ref["output_ids"],
                     "first_difference": _first_difference(out, ref["output_ids"])})
        prefill_stats.append(g.prefill_stats)
        decode_stats.append(g.decode_stats)
        if progress is not None:
            progress.update(1)
    meter.end_phase("generate")
    counters = rt.cache.stats()  # generation only: taken before the fidelity pass below
    trace = pd.DataFrame(rt.model.trace, columns=list(TRACE_COLUMNS))
    with atomic_path(out_trace) as tmp:
        trace.to_parquet(tmp, index=False)

    rt.model.record_trace = False
    native_logits = load_file(native_logits_path)
    scores, max_diff = [], 0.0
    for i, (run, ref) in enumerate(zip(runs, native_json["prompts"])):
        ours = teacher_forced_logits(rt, ref["input_ids"], ref["output_ids"], prompt=i)
        theirs = native_logits[f"prompt_{i}"]
        check_finite(theirs, f"native, prompt {i}")
        check_finite(ours, f"depth {depth}, prompt {i}")
        scores.append(fidelity(theirs, ours, ref["output_ids"]))
        max_diff = max(max_diff, (theirs - ours).abs().max().item())
        run["fidelity"] = scores[-1]
    cfg = rt.config
    seq = max(len(r["input_ids"]) + max_new_tokens for r in runs)
    kv = kv_bytes(cfg, depth, seq, torch_dtype)
    experts = rt.cache.slab_bytes  # capacity x one expert in the compute dtype, per pool
    # on the CPU the host tier is in the memory measured (RSS); on a GPU it is host RAM, beside it
    host = rt.cache.host_tier_bytes if device.type == "cpu" else 0
    bound = {"dense_bytes": rt.dense_bytes, "expert_cache_bytes": experts, "experts_held": rt.cache.slots,
             "kv_cache_bytes": kv, "host_tier_bytes": host, "total_bytes": rt.dense_bytes + experts + kv + host}
    result = {"kind": "selective", "depth": depth, "num_layers": cfg.num_layers, **environment(device, torch_dtype),
              "load_s": load_s, "tok_s": decode_rate(runs), "speed_bound": speed_bound(cfg, depth, torch_dtype, device),
              "prefill_s": sum(r["prefill_s"] for r in runs),
              "memory": meter.report(bound),
              "cache": {**cache, "capacity": rt.cache.capacity, "host_tier_bytes": rt.cache.host_tier_bytes,
                        **counters,
                        "prefill": _sum(prefill_stats), "decode": _sum(decode_stats)},
              "fidelity": {"top1_agreement": _mean(scores, "top1_agreement"), "mean_kl": _mean(scores, "mean_kl"),
                           "perplexity": _mean(scores, "perplexity"), "max_abs_logit_diff": max_diff,
                           "tokens_identical": all(r["tokens_identical_to_native"] for r in runs)},
              "trace": str(out_trace), "prompts": runs}
    write_json(out_json, result)
    return result


def _sum(stats: list[dict]) -> dict:
    keys = [k for k in stats[0] if k != "hit_rate"] if stats else []
    total = {k: sum(s[k] for s in stats) for k in keys}
    if "hits" in total:
        n = total["hits"] + total["misses"]
        total["hit_rate"] = total["hits"] / n if n else None
    return total


def _mean(scores: list[dict], key: str) -> float:
    return sum(s[key] for s in scores) / len(scores)
