"""Resident decode on quantized experts against 16-bit ones and transformers' native model, in one run,
each next to its own HBM bound (the bytes a token reads: quantized experts' qweights and scales, the rest
in bf16, and the KV it attends over), with each side's bf16 fidelity against native.

Layers are quantized on the GPU (checkpoint.quantize.quantize_layer, device cuda: the same bytes as the
workflow's CPU jobs, in seconds instead of minutes at real size).

  PYTHONPATH=src python3 benchmarks/quantized_speed.py --layers 48 --experts 16 \
      --out benchmarks/results/quantized_speed_h100_48x16.json

--prefill-lengths 36,2048,8192,32768 also times each prompt length's first token, every bit-width beside
native (the quantized prompt through the grouped GEMM that reads the slabs as stored).

Offloaded (--capacity C): each bit-width also with C experts per layer on the GPU and every expert in the
host tier, misses read in place by the decode kernels, sampled at temperature 1 (so that consecutive
tokens route differently) on a checkpoint whose embeddings are scaled by --embed-scale (routing that
follows the token: docs/benchmarks.md's regime). Each offloaded run stands beside its link bound: its
resident step plus its misses' bytes read over the bus at the zero-copy probe's rate. Then transformers
with accelerate's device_map="auto" within the GPU memory our smallest offloaded run held, as a
memory-limited user runs it:

  PYTHONPATH=src python3 benchmarks/quantized_speed.py --layers 16 --experts 128 --capacity 32 \
      --embed-scale 100 --out benchmarks/results/quantized_offloaded_h100_16x128.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from moe_offload.checkpoint.dims import spec as dims_spec  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from moe_offload.checkpoint.quantize import quantize_layer  # noqa: E402
from moe_offload.resources import bytes_read_per_token, kv_bytes  # noqa: E402
from moe_offload.runtime.generate import fidelity, generate, load_runtime, teacher_forced_logits  # noqa: E402
from moe_offload.runtime.native import load_native, load_native_offloaded, native_generate  # noqa: E402
from common import emit, random_prompt  # noqa: E402
from probes import free, hbm_probe, zero_copy_probe  # noqa: E402


def offloaded(a, files, folder, ids, dtype, resident_s: float, result: dict) -> dict:
    """`folder`'s experts with a.capacity per layer on the GPU and all of them in the host tier, misses read
    in place; sampled decoding (seeds 0..), against the link bound from this bit-width's resident step."""
    rt = load_runtime(files.dense, folder, files.ckpt, capacity=a.capacity, device="cuda", dtype=dtype,
                      pin_memory=True, host_tier=True)
    rt.model.trace.enabled = False
    torch.cuda.reset_peak_memory_stats()
    generate(rt, ids, a.new_tokens, temperature=1.0, seed=100)  # warm-up
    runs = [generate(rt, ids, a.new_tokens, temperature=1.0, seed=i) for i in range(a.repeats)]
    steps = max(a.new_tokens - 1, 1)
    misses = statistics.median(g.decode_stats["misses"] for g in runs) / steps
    link = result["zero_copy"]["bytes_per_second"]
    transfers = misses * rt.cache.bytes_per_expert / link
    tok_s = statistics.median(g.decode_tokens_per_second for g in runs)
    out = {"decode_tok_s": tok_s, "capacity_per_layer": a.capacity, "in_place_misses": rt.step.in_place,
           "misses_per_token": misses, "hit_rate": statistics.median(g.decode_stats["hit_rate"] for g in runs),
           "bytes_per_expert": rt.cache.bytes_per_expert, "link": "zero-copy reads of the pinned host tier",
           "link_bound_tok_s": 1 / (resident_s + transfers), "overlap_bound_tok_s": 1 / max(resident_s, transfers),
           "gpu_peak_bytes": torch.cuda.max_memory_allocated()}
    out["fraction_of_link_bound"] = tok_s / out["link_bound_tok_s"]
    out["fraction_of_overlap_bound"] = tok_s / out["overlap_bound_tok_s"]
    rt.cache.close()
    del rt
    free(torch.device("cuda"))
    return out


def accelerate_run(a, files, ids, dtype, device, work: Path, result: dict) -> dict:
    """transformers with accelerate's device_map="auto" within the GPU memory the smallest of our offloaded
    runs held (the lowest bit-width's), the rest in CPU RAM: what a memory-limited user runs instead."""
    held = min(r["gpu_peak_bytes"] for r in result["offloaded"].values())
    budget_mb = max(1, held // 2**20)
    model, placement = load_native_offloaded(files.ckpt, device, dtype, {0: f"{budget_mb}MiB", "cpu": "100GiB"},
                                             work / "offload")
    native_generate(model, ids, 2)
    run = native_generate(model, ids, a.accelerate_tokens)
    del model
    free(device)
    return {"gpu_budget_mb": budget_mb, "placement": placement, "new_tokens": a.accelerate_tokens,
            "tok_s": run["tok_s"], "decoding": "greedy (transformers generate)"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--bits", default="16,8,4")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--prompt", type=int, default=36)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--capacity", type=int, default=None, help="also run offloaded: this many experts per layer "
                   "on the GPU, the host tier, misses read in place")
    p.add_argument("--embed-scale", type=float, default=1.0, help="the checkpoint's embeddings scaled by this")
    p.add_argument("--accelerate-tokens", type=int, default=8, help="new tokens of the accelerate run (slow)")
    p.add_argument("--prefill-lengths", default="", help="also time the prompt at these lengths (random ids), "
                   "each bit-width and native, every expert resident: the grouped GEMM over quantized slabs")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.set_grad_enabled(False)
    spec = dims_spec("real", a.layers, layout="qwen3_moe", num_experts=a.experts)
    if a.embed_scale != 1:
        spec["embed_scale"] = a.embed_scale
    work = Path(a.workdir or tempfile.mkdtemp(prefix="quant."))
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device_name": torch.cuda.get_device_name(),
              "torch": torch.__version__, "spec": spec, "group_size": a.group, "prompt_tokens": a.prompt,
              "new_tokens": a.new_tokens, "runs": {}, "offloaded": {}}
    try:
        start = time.perf_counter()
        files = build_and_extract(spec, work)
        cfg = files.config
        dirs = {16: files.dir}
        for bits in (int(b) for b in a.bits.split(",") if int(b) != 16):
            dirs[bits] = work / f"q{bits}"
            for layer, path in files.layers.items():
                if not (dirs[bits] / path.name).exists():
                    quantize_layer(path, dirs[bits] / path.name, bits, a.group, device="cuda")
        result["prepare_seconds"] = time.perf_counter() - start
        print(f"# built, extracted and quantized in {result['prepare_seconds']:.0f} s", file=sys.stderr, flush=True)
        result["hbm"] = hbm_probe(device)
        bandwidth = result["hbm"]["bytes_per_second"]
        if a.capacity:
            result["zero_copy"] = zero_copy_probe(device)
        ids = random_prompt(cfg.vocab_size, a.prompt, seed=0)
        native = load_native(files.ckpt, device, dtype)
        native_generate(native, ids, a.new_tokens)
        nat = [native_generate(native, ids, a.new_tokens) for _ in range(a.repeats)]
        cont = nat[-1]["output_ids"]
        full = torch.tensor([ids + cont], device=device)
        theirs = native(input_ids=full, attention_mask=torch.ones_like(full),
                        logits_to_keep=len(cont) + 1).logits[0, :-1].float().cpu()
        result["native"] = {"decode_tok_s": statistics.median(r["tok_s"] for r in nat)}
        lengths = [int(n) for n in a.prefill_lengths.split(",") if n]
        prompts = {n: random_prompt(cfg.vocab_size, n, seed=n) for n in lengths}  # context_sweep's prompts
        for n in lengths:  # time to the first token; a warm-up at each length first
            native_generate(native, prompts[n], 2)
            result["native"][f"prefill_s_{n}"] = statistics.median(
                native_generate(native, prompts[n], 2)["prefill_s"] for _ in range(a.repeats))
        del native
        free(device)
        context = a.prompt + a.new_tokens // 2
        for bits, folder in dirs.items():
            rt = load_runtime(files.dense, folder, files.ckpt, device="cuda", dtype=dtype, pin_memory=True)
            for layer, spans in rt.cache.spans.items():  # resident: every expert loaded before timing
                rt.cache.get_many(layer, list(range(len(spans))))
            rt.model.trace.enabled = False
            generate(rt, ids, a.new_tokens)  # warm-up: compiles, captures the graphs
            runs = [generate(rt, ids, a.new_tokens) for _ in range(a.repeats)]
            per_token = (bytes_read_per_token(cfg, a.layers, dtype, rt.cache.bytes_per_expert)
                         + kv_bytes(cfg, a.layers, context, dtype))
            tok_s = statistics.median(g.decode_tokens_per_second for g in runs)
            result["runs"][str(bits)] = {
                "decode_tok_s": tok_s, "bytes_per_expert": rt.cache.bytes_per_expert,
                "bytes_read_per_token": per_token, "hbm_bound_tok_s": bandwidth / per_token,
                "fraction_of_own_bound": tok_s * per_token / bandwidth,
                "prefill_s": statistics.median(g.prefill_seconds for g in runs),
                "greedy_tokens_identical_to_native": runs[-1].tokens[0] == cont,
                "fidelity_vs_native": fidelity(theirs, teacher_forced_logits(rt, ids, cont), cont)}
            for n in lengths:
                generate(rt, prompts[n], 2)
                ours = statistics.median(generate(rt, prompts[n], 2).prefill_seconds for _ in range(a.repeats))
                result["runs"][str(bits)][f"prefill_s_{n}"] = ours
                result["runs"][str(bits)][f"prefill_native_over_ours_{n}"] = result["native"][f"prefill_s_{n}"] / ours
            print(f"# {bits} bits: {tok_s:.1f} tok/s", file=sys.stderr, flush=True)
            rt.cache.close()
            del rt
            free(device)
            if a.capacity:
                result["offloaded"][str(bits)] = offloaded(a, files, folder, ids, dtype, 1 / tok_s, result)
                print(f"# {bits} bits, cache {a.capacity}: {result['offloaded'][str(bits)]['decode_tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
            if a.out:
                emit(result, a.out)
        if a.capacity:
            result["accelerate"] = accelerate_run(a, files, ids, dtype, device, work, result)
            base_off = result["offloaded"].get("16", {}).get("decode_tok_s")
            result["offloaded_ratios"] = {f"{bits}_over_16": r["decode_tok_s"] / base_off
                                          for bits, r in result["offloaded"].items() if base_off}
            if result["accelerate"].get("tok_s"):
                result["offloaded_ratios"].update({f"{bits}_over_accelerate": r["decode_tok_s"] / result["accelerate"]["tok_s"]
                                                   for bits, r in result["offloaded"].items()})
        base = result["runs"].get("16", {}).get("decode_tok_s")
        result["ratios"] = {f"{bits}_over_16": r["decode_tok_s"] / base for bits, r in result["runs"].items() if base}
        result["ratios"].update({f"{bits}_over_native": r["decode_tok_s"] / result["native"]["decode_tok_s"]
                                 for bits, r in result["runs"].items()})
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    emit(result, a.out)


if __name__ == "__main__":
    main()
