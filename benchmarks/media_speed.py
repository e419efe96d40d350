"""Prefill of a 30 s audio clip and of a 1-megapixel image at real dims, ours against transformers' thinker
in the same run, each next to its bound; decode after them.

A synthetic Qwen3-Omni checkpoint with the real thinker's text dims (a few layers) and the real towers'
dims (transformers' defaults: audio encoder 32 x 1280, vision encoder 27 x 1152, deepstack after 8/16/24;
1.2 B parameters, random), the hub's image limits (max 12845056 pixels: a 1000 x 1000 image is resized to
992 x 992, 961 tokens). Per prompt, after a warm-up: time to first token (towers + merge + prefill) and
its towers part, decode tok/s after it, greedy tokens identical to native's. Bounds, from the bf16 matmul
rate probed here (attention's quadratic terms left out): towers 2 x tower parameters x the tokens through
them (audio: its output tokens; vision: every 16-pixel patch through the blocks, then the mergers), text
prefill 2 x active parameters x prompt tokens; decode: the weights a token reads + its KV / the HBM read
rate probed here.

  PYTHONPATH=src python3 benchmarks/media_speed.py --layers 4 --device cuda --out benchmarks/results/media_speed_h100.json
  PYTHONPATH=src python3 benchmarks/media_speed.py --dims tiny --layers 2 --device cpu --seconds 3 --side 128  # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

from moe_offload.analysis.run_info import matmul_probe  # noqa: E402
from moe_offload.checkpoint.dims import DIMS  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from moe_offload.checkpoint.extract import extract_towers  # noqa: E402
from moe_offload.checkpoint.layouts import read_config  # noqa: E402
from moe_offload.resources import active_params, bytes_read_per_token, kv_bytes, tower_params  # noqa: E402
from moe_offload.runtime.generate import generate, load_runtime  # noqa: E402
from moe_offload.runtime.media import MediaProcessor  # noqa: E402
from moe_offload.runtime.native import native_generate  # noqa: E402
from moe_offload.sample_media import gradient, tone, write_image, write_wav  # noqa: E402
from common import emit  # noqa: E402
from probes import hbm_probe  # noqa: E402

HUB_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}  # Qwen3-Omni's preprocessor_config.json


def audio_params(thinker: dict) -> int:
    """The audio tower's parameters (its transformer layers run on its output tokens; the convolutions on 8x
    as many frames are counted as if on the output tokens: a looser, lower bound)."""
    return tower_params(thinker) - tower_params({**thinker, "audio_config": {**thinker["audio_config"], "encoder_layers": 0,
                                                                                 "d_model": 0, "downsample_hidden_size": 0,
                                                                                 "output_dim": 0}})


def vision_flops(v: dict, patches: int, merged: int) -> int:
    """2 x the parameters each token passes: every patch through the patch embedding and the blocks, every
    merged token through the merger and the deepstack mergers."""
    h, i, m, out = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2, v["out_hidden_size"]
    per_patch = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2 * h + v["depth"] * (
        4 * h * h + 2 * h * i)
    per_merged = (1 + len(v.get("deepstack_visual_indexes") or [])) * (m * m + m * out)
    return 2 * (per_patch * patches + per_merged * merged)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", choices=["real", "tiny"], default="real", help="tiny: the config's synthetic dims and "
                   "tiny towers (a smoke test on the CPU)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--side", type=int, default=1000, help="the image is side x side pixels")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device, dtype = torch.device(a.device), torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    torch.set_grad_enabled(False)
    spec = dict(DIMS[a.dims], layout="qwen3_omni_thinker", num_layers=a.layers, seed=0, mlp_only_layers=[], towers=a.dims)
    if a.experts:
        spec["num_experts"] = a.experts
    work = Path(a.workdir or tempfile.mkdtemp(prefix="media_speed."))
    try:
        files = build_and_extract(spec, work)
        ckpt, cfg = files.ckpt, files.config
        pre = json.loads((ckpt / "preprocessor_config.json").read_text())
        (ckpt / "preprocessor_config.json").write_text(json.dumps(pre | HUB_PIXELS))
        if not (work / "towers.safetensors").exists():
            extract_towers(ckpt, work / "towers.safetensors")
        thinker = read_config(ckpt)["thinker_config"]
        audio = write_wav(work / "speech.wav", tone(a.seconds, 220.0))
        image = write_image(work / "photo.png", gradient(a.side, a.side))
        proc = MediaProcessor(ckpt)
        prompts = {"text+audio": proc("What is said here?", [audio], []),
                   "text+image": proc("Describe this picture.", [], [image])}
        rt = load_runtime(files.dense, files.dir, ckpt, device=a.device, dtype=dtype,
                          towers_path=work / "towers.safetensors")
        for layer, spans in rt.cache.spans.items():  # every expert resident before timing
            rt.cache.get_many(layer, list(range(len(spans))))
        rt.model.trace.enabled = False
        native = transformers.Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(
            ckpt, dtype=dtype).to(device).eval()
        matmul = matmul_probe(device, dtype)["flops_per_second"]
        hbm = hbm_probe(device)["bytes_per_second"] if device.type == "cuda" else None
        weights_per_token = bytes_read_per_token(cfg, a.layers, dtype)
        rows = {}
        for kind, m in prompts.items():
            t = len(m.input_ids)
            generate(rt, None, a.new_tokens, media=m)  # warm-up
            ours = [generate(rt, None, a.new_tokens, media=m) for _ in range(a.repeats)]
            native_generate(native, m.input_ids, a.new_tokens, media=m.native_kwargs())
            theirs = [native_generate(native, m.input_ids, a.new_tokens, media=m.native_kwargs()) for _ in range(a.repeats)]
            if kind == "text+audio":
                media_tokens = m.input_ids.count(thinker["audio_token_id"])
                tower_flops = 2 * audio_params(thinker) * media_tokens
            else:
                media_tokens = m.input_ids.count(thinker["image_token_id"])
                tower_flops = vision_flops(thinker["vision_config"], int(m.image_grid_thw.prod()), media_tokens)
            prefill_bound = (tower_flops + 2 * active_params(cfg, a.layers) * t) / matmul
            row = {"prompt_tokens": t, "media_tokens": media_tokens,
                   "ours": {"ttft_s": statistics.median(g.prefill_seconds for g in ours),
                            "towers_s": statistics.median(g.towers_seconds for g in ours),
                            "decode_tok_s": statistics.median(g.decode_tokens_per_second for g in ours)},
                   "native": {"ttft_s": statistics.median(r["prefill_s"] for r in theirs),
                              "decode_tok_s": statistics.median(r["tok_s"] for r in theirs)},
                   "greedy_tokens_identical": ours[-1].tokens[0] == theirs[-1]["output_ids"],
                   "bound": {"towers_flops": tower_flops, "ttft_s": prefill_bound}}
            if hbm:
                row["bound"]["decode_tok_s"] = hbm / (weights_per_token + kv_bytes(cfg, a.layers, t + a.new_tokens // 2, dtype))
            for side in ("ours", "native"):
                row[side]["ttft_fraction_of_bound"] = prefill_bound / row[side]["ttft_s"]
                if hbm:
                    row[side]["decode_fraction_of_bound"] = row[side]["decode_tok_s"] / row["bound"]["decode_tok_s"]
            rows[kind] = row
            print(f"# {kind}: {row}", file=sys.stderr, flush=True)
        emit({"command": " ".join([Path(sys.executable).name] + sys.argv),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__, "transformers": transformers.__version__, "spec": spec,
              "matmul_flops_per_s": matmul, "hbm_bytes_per_s": hbm, "tower_params": tower_params(thinker),
              "prompts": rows}, a.out)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
