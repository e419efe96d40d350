"""Audio and image prompts: our runtime against transformers' thinker on one device (meant for cuda).

For the embedded default (trained text model, random towers) and a synthetic checkpoint of odd dims, and
for each kind of prompt (text+audio: a tone; text+image: a gradient; text+both: noise and a noise image,
all made here): float32 greedy tokens identical yes/no and max |logit difference| over every decode
step and the teacher-forced logits, through the PyTorch decode step and (on CUDA) the fused kernels, at
capacity all and top-k + 2; then bfloat16 against native bfloat16: top-1 agreement and mean KL on
native's greedy tokens (teacher-forced), and tokens identical. Printed as JSON.

  PYTHONPATH=src python3 benchmarks/media_parity.py --device cuda --out benchmarks/results/media_parity_gpu.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration  # noqa: E402

from moe_offload.checkpoint.extract import extract_dense, extract_layer, extract_towers  # noqa: E402
from moe_offload.checkpoint.layouts import detect_checkpoint  # noqa: E402
from moe_offload.checkpoint.synthetic import build_synthetic  # noqa: E402
from moe_offload.runtime.generate import fidelity, generate, load_runtime, teacher_forced_logits  # noqa: E402
from moe_offload.runtime.media import MediaProcessor  # noqa: E402
from moe_offload.sample_media import gradient, noise, noise_image, tone, write_image, write_wav  # noqa: E402
from common import emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]
ODD = dict(layout="qwen3_omni_thinker", num_layers=3, num_experts=10, experts_per_token=3, hidden_size=48,
           moe_intermediate_size=24, num_heads=4, num_kv_heads=2, head_dim=12, mlp_only_layers=[1], seed=1,
           max_shard_size="256KB")
KINDS = {"text+audio": (["tone"], []), "text+image": ([], ["gradient"]), "text+audio+image": (["noise"], ["speckle"])}


def media(work: Path) -> dict:
    return dict(tone=write_wav(work / "tone.wav", tone(1.3)), noise=write_wav(work / "noise.wav", noise(0.7)),
                gradient=write_image(work / "gradient.png", gradient(64, 96)),
                speckle=write_image(work / "speckle.jpg", noise_image(96, 64)))


@torch.inference_mode()
def native_case(ref, prompt, device, new_tokens):
    ids = torch.tensor([prompt.input_ids], device=device)
    kw = {k: v.to(device) for k, v in prompt.native_kwargs().items()}
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw, max_new_tokens=new_tokens,
                       do_sample=False, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    forced = ref(input_ids=seq, attention_mask=torch.ones_like(seq), **kw).logits[0, ids.shape[1] - 1:-1]
    return seq[0, ids.shape[1]:].tolist(), [l[0].float().cpu() for l in out.logits], forced.float().cpu()


def check(name, ckpt, work, device, new_tokens):
    _, cfg = detect_checkpoint(ckpt)
    extract_dense(ckpt, work / "dense.safetensors")
    extract_towers(ckpt, work / "towers.safetensors")
    for L in cfg.expert_layers:
        extract_layer(ckpt, L, work / f"layer_{L}.safetensors")
    files, proc = media(work), MediaProcessor(ckpt)
    prompts = {kind: proc("What do you hear and see?", [files[a] for a in audio], [files[i] for i in images])
               for kind, (audio, images) in KINDS.items()}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ref = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
        native = {kind: native_case(ref, p, device, new_tokens) for kind, p in prompts.items()}
        del ref
        kernels = [False, True] if device.startswith("cuda") else [False]
        caps = {"all": cfg.num_experts, "top_k+2": cfg.experts_per_token + 2} if dtype == torch.float32 else {"all": cfg.num_experts}
        for use_kernels in kernels:
            for cap_name, cap in caps.items():
                rt = load_runtime(work / "dense.safetensors", work, ckpt, capacity=cap, device=device, dtype=dtype,
                                  use_kernels=use_kernels, towers_path=work / "towers.safetensors")
                for kind, p in prompts.items():
                    tokens, steps, forced = native[kind]
                    g = generate(rt, None, new_tokens, media=p, return_logits=True)
                    ours_forced = teacher_forced_logits(rt, None, tokens, media=p)
                    row = {"checkpoint": name, "dtype": str(dtype).split(".")[1], "kernels": use_kernels,
                           "capacity": cap_name, "kind": kind, "prompt_tokens": len(p.input_ids),
                           "tokens_identical": g.tokens[0] == tokens,
                           "max_abs_logit_diff_steps": max((a[0] - b).abs().max().item() for a, b in zip(g.logits, steps)),
                           "max_abs_logit_diff_forced": (ours_forced - forced).abs().max().item()}
                    if dtype != torch.float32:
                        f = fidelity(forced, ours_forced, tokens)
                        row |= {"top1_agreement": f["top1_agreement"], "mean_kl": f["mean_kl"]}
                    rows.append(row)
                del rt
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="media_parity."))
    try:
        rows = check("default", REPO / "models" / "default", work / "default", args.device, args.new_tokens)
        rows += check("odd_dims", build_synthetic(work / "odd" / "ckpt", ODD), work / "odd", args.device, args.new_tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f32 = [r for r in rows if r["dtype"] == "float32"]
    bf16 = [r for r in rows if r["dtype"] == "bfloat16"]
    emit({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
          "torch": torch.__version__, "rows": rows,
          "float32": {"tokens_identical": f"{sum(r['tokens_identical'] for r in f32)}/{len(f32)}",
                      "max_abs_logit_diff": max(max(r["max_abs_logit_diff_steps"], r["max_abs_logit_diff_forced"])
                                                for r in f32)},
          "bfloat16": {"tokens_identical": f"{sum(r['tokens_identical'] for r in bf16)}/{len(bf16)}",
                       "min_top1_agreement": min(r["top1_agreement"] for r in bf16),
                       "max_mean_kl": max(r["mean_kl"] for r in bf16)}}, args.out)


if __name__ == "__main__":
    main()
