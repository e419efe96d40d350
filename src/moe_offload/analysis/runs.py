"""One selective generation run as the workflow records it: ours at a depth (native runs: native_runs.py).

Both write the same JSON shape: `prompts` ({prompt, input_ids, output_ids, text}), load_s, decode tok/s
and prefill tok/s next to their bounds (speed_bound, from rates probed in the same job), peak memory next
to its bound, and the device. Depth runs add the cache counters, fidelity against native (teacher-forced
on native's tokens) and a router trace for cache profiling.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ..atomic import atomic_path, write_json
from ..errors import InputError
from ..resources import kv_bytes
from ..runtime.memory import MemoryMeter
from .run_info import check_finite, decode_rate, device_of, environment, prefill_rate, probe, speed_bound


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
              progress=None, start_rss: int | None = None, heldout: tuple[Path, int, int] | None = None,
              towers_path=None) -> dict:
    """heldout: (a text file, tokens, window): also the perplexity of its first `tokens` tokens in windows
    of `window`, teacher-forced. towers_path: the towers file, for prompts with audio or images (their
    inputs are made again here from the same files by the same processor; the token ids are native's)."""
    from ..runtime.generate import fidelity, generate, load_runtime, teacher_forced_logits
    from ..runtime.media import MediaProcessor
    from ..runtime.trace import TRACE_COLUMNS

    device, torch_dtype = device_of(device), getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    meter = MemoryMeter(device, start_rss)
    start = time.perf_counter()
    rt = load_runtime(dense_path, layer_files, checkpoint_dir, depth=depth, capacity=cache["capacity"],
                      scope=cache["scope"], policy=cache["policy"], device=str(device), dtype=torch_dtype,
                      pin_memory=cache.get("pin_memory", False), side_stream=cache.get("side_stream", False),
                      host_tier=host_tier_on(cache.get("host_tier", False), layer_files),
                      use_kernels=cache.get("fused_kernels"), unified=cache.get("unified_memory", False),
                      prefetch=cache.get("prefetch", False), towers_path=towers_path)
    load_s = time.perf_counter() - start
    meter.end_phase("load")
    runs, prefill_stats, decode_stats, media = [], [], [], []
    processor = None
    for i, ref in enumerate(native_json["prompts"]):
        m = None
        if isinstance(ref["prompt"], dict):
            processor = processor or MediaProcessor(checkpoint_dir, tok)
            m = processor.inputs(ref["prompt"]["audio"], ref["prompt"]["image"])[0]
            m.input_ids = list(ref["input_ids"])
        media.append(m)
        # the very input ids native used, so both sides see the same tokens
        g = generate(rt, ref["input_ids"], max_new_tokens, eos_token_id=tok.eos_token_id, prompt=i, media=m)
        out = g.tokens[0]
        hits = g.prefill_stats["hits"] + g.decode_stats["hits"]
        accesses = hits + g.prefill_stats["misses"] + g.decode_stats["misses"]
        runs.append({"prompt": ref["prompt"], "kind": m.kind if m is not None else "text",
                     "input_ids": ref["input_ids"], "output_ids": out,
                     "text": tok.decode(out, skip_special_tokens=True), "prefill_s": g.prefill_seconds,
                     "towers_s": g.towers_seconds, "decode_s": g.decode_seconds, "tok_s": g.decode_tokens_per_second,
                     "hit_rate": hits / accesses if accesses else None,
                     "tokens_identical_to_native": out == ref["output_ids"],
                     "first_difference": _first_difference(out, ref["output_ids"])})
        prefill_stats.append(g.prefill_stats)
        decode_stats.append(g.decode_stats)
        if progress is not None:
            progress.update(1)
    meter.end_phase("generate")
    probes = probe(device, torch_dtype)  # after the timed generation and its memory peak, which it must not touch
    counters = rt.cache.stats()  # generation only: taken before the fidelity pass below
    trace = pd.DataFrame(rt.model.trace.rows, columns=list(TRACE_COLUMNS))
    with atomic_path(out_trace) as tmp:
        trace.to_parquet(tmp, index=False)

    rt.model.trace.enabled = False
    native_logits = load_file(native_logits_path)
    scores, max_diff = [], 0.0
    for i, (run, ref) in enumerate(zip(runs, native_json["prompts"])):
        ours = teacher_forced_logits(rt, ref["input_ids"], ref["output_ids"], prompt=i, media=media[i])
        theirs = native_logits[f"prompt_{i}"]
        check_finite(theirs, f"native, prompt {i}")
        check_finite(ours, f"depth {depth}, prompt {i}")
        scores.append(fidelity(theirs, ours, ref["output_ids"]))
        max_diff = max(max_diff, (theirs - ours).abs().max().item())
        run["fidelity"] = scores[-1]
    heldout_ppl = heldout_perplexity(rt, tok, *heldout) if heldout else None
    cfg = rt.config
    seq = max(len(r["input_ids"]) + max_new_tokens for r in runs)
    kv = kv_bytes(cfg, depth, seq, torch_dtype)
    experts = rt.cache.slab_bytes  # capacity x one expert in the compute dtype, per pool
    if rt.cache.unified and device.type != "cpu":  # in host RAM, beside the device memory measured
        experts = 0
    # on the CPU the host tier is in the memory measured (RSS); on a GPU it is host RAM, beside it
    host = rt.cache.host_tier_bytes if device.type == "cpu" else 0
    towers = rt.towers.bytes if rt.towers is not None else 0  # on the device, in the compute dtype
    bound = {"dense_bytes": rt.dense_bytes, "expert_cache_bytes": experts, "experts_held": rt.cache.slot_count,
             "kv_cache_bytes": kv, "host_tier_bytes": host, "towers_bytes": towers,
             "total_bytes": rt.dense_bytes + experts + kv + host + towers}
    result = {"kind": "selective", "depth": depth, "num_layers": cfg.num_layers, **environment(device, torch_dtype),
              "load_s": load_s, "tok_s": decode_rate(runs), "prefill_s": sum(r["prefill_s"] for r in runs),
              "prefill_tok_s": prefill_rate(runs), "speed_bound": speed_bound(cfg, depth, torch_dtype, device, runs, probes,
                                                          rt.cache.bytes_per_expert),
              "experts": {"bits": rt.cache.stored_bits[0], "hot_bits": rt.cache.stored_bits[1],
                          "hot_per_layer": _hot_per_layer(rt.cache),
                          "group_size": rt.cache.quant[1] if rt.cache.quant else None,
                          "bytes_per_expert": rt.cache.bytes_per_expert},
              "probes": probes,
              "memory": meter.report(bound),
              "cache": {**cache, "capacity": rt.cache.capacity, "host_tier_bytes": rt.cache.host_tier_bytes,
                        "unified_bytes": rt.cache.slab_bytes if rt.cache.unified else 0,
                        **counters,
                        "prefill": _sum(prefill_stats), "decode": _sum(decode_stats)},
              "fidelity": {"top1_agreement": _mean(scores, "top1_agreement"), "mean_kl": _mean(scores, "mean_kl"),
                           "perplexity": _mean(scores, "perplexity"), "max_abs_logit_diff": max_diff,
                           "heldout_perplexity": heldout_ppl, "heldout_tokens": heldout[1] if heldout else None,
                           "tokens_identical": all(r["tokens_identical_to_native"] for r in runs)},
              "trace": str(out_trace), "prompts": runs}
    if rt.towers is not None:  # which prompt tokens are the towers' (the profile splits experts by modality)
        result["media_token_ids"] = {"audio": rt.towers.thinker["audio_token_id"],
                                     "image": rt.towers.thinker["image_token_id"]}
    write_json(out_json, result)
    return result


def heldout_perplexity(rt, tok, path: Path, tokens: int, window: int) -> float:
    """exp(mean negative log-likelihood) over the text's first `tokens` tokens, cut into windows of `window`
    (a model is scored at the context lengths it was trained on: the default's 256), each token predicted
    from those before it in its window (one teacher-forced forward per window)."""
    from ..runtime.generate import teacher_forced_logits

    ids = tok(Path(path).read_text(encoding="utf-8"))["input_ids"][:tokens]
    windows = [ids[i: i + window] for i in range(0, len(ids), window) if len(ids[i: i + window]) >= 2]
    if not windows:
        raise InputError(f"{path}: fewer than 2 tokens, no perplexity to measure")
    nll, count = 0.0, 0
    for part in windows:
        logits = teacher_forced_logits(rt, part[:1], part[1:])
        check_finite(logits, f"held-out text {path}")
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(part[1:]), reduction="sum").item()
        count += len(part) - 1
    return math.exp(nll / count)


def _hot_per_layer(cache) -> int | None:
    """Experts per layer kept at the hot precision (precision by popularity), or None."""
    hot = cache.stored_bits[1]
    if hot is None:
        return None
    return max(sum(s.bits == hot for s in spans) for spans in cache.spans.values())


def _sum(stats: list[dict]) -> dict:
    keys = [k for k in stats[0] if k != "hit_rate"] if stats else []
    total = {k: sum(s[k] for s in stats) for k in keys}
    if "hits" in total:
        n = total["hits"] + total["misses"]
        total["hit_rate"] = total["hits"] / n if n else None
    return total


def _mean(scores: list[dict], key: str) -> float:
    return sum(s[key] for s in scores) / len(scores)
