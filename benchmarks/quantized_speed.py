"""Resident decode on quantized experts against 16-bit ones and transformers' native model, in one run,
each next to its own HBM bound (the bytes a token reads: quantized experts' qweights and scales, the rest
in bf16, and the KV it attends over), with each side's bf16 fidelity against native.

Layers are quantized on the GPU (checkpoint.quantize.quantize_layer, device cuda: the same bytes as the
workflow's CPU jobs, in seconds instead of minutes at real size).

  PYTHONPATH=src python3 benchmarks/quantized_speed.py --layers 48 --experts 16 \
      --out benchmarks/results/quantized_speed_h100_48x16.json
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
from moe_offload.runtime.native import load_native, native_generate  # noqa: E402
from common import emit  # noqa: E402
from probes import free, hbm_probe  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--bits", default="16,8,4")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--prompt", type=int, default=36)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.set_grad_enabled(False)
    spec = dims_spec("real", a.layers, layout="qwen3_moe", num_experts=a.experts)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="quant."))
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device_name": torch.cuda.get_device_name(),
              "torch": torch.__version__, "spec": spec, "group_size": a.group, "prompt_tokens": a.prompt,
              "new_tokens": a.new_tokens, "runs": {}}
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
        ids = torch.randint(16, cfg.vocab_size - 16, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        native = load_native(files.ckpt, device, dtype)
        native_generate(native, ids, a.new_tokens)
        nat = [native_generate(native, ids, a.new_tokens) for _ in range(a.repeats)]
        cont = nat[-1]["output_ids"]
        full = torch.tensor([ids + cont], device=device)
        theirs = native(input_ids=full, attention_mask=torch.ones_like(full),
                        logits_to_keep=len(cont) + 1).logits[0, :-1].float().cpu()
        result["native"] = {"decode_tok_s": statistics.median(r["tok_s"] for r in nat)}
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
            print(f"# {bits} bits: {tok_s:.1f} tok/s", file=sys.stderr, flush=True)
            rt.cache.close()
            del rt
            free(device)
            if a.out:
                emit(result, a.out)
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
