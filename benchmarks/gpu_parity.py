"""Float32 parity of our runtime against transformers' model on one device (meant for cuda), both layouts.

For each layout a small seeded synthetic checkpoint is built and extracted; transformers' model (default
experts implementation and eager) and our runtime (capacity = all experts, top-k, and 6) run on the same
device in float32, with the fused Triton kernels and without, pinned staging on. Printed as JSON: per prompt, greedy tokens identical yes/no and max |logit difference|
over the prefill's full logits and every decode step's logits.

  PYTHONPATH=src python3 benchmarks/gpu_parity.py --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

from moe_offload.runtime import cache_policy  # noqa: E402
from moe_offload.runtime.generate import generate, load_runtime  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from common import emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)
from speed_runs import load_native_model  # noqa: E402

BASE = dict(num_layers=6, num_experts=32, experts_per_token=4, hidden_size=128, moe_intermediate_size=64,
            num_heads=4, num_kv_heads=2, head_dim=32, seed=1, max_shard_size="1MB")
LAYOUTS = {"qwen3_omni_thinker": dict(BASE, layout="qwen3_omni_thinker"),
           "qwen3_moe": dict(BASE, layout="qwen3_moe", mlp_only_layers=[1]),
           # dimensions no kernel tile is a power of two of
           "odd_dims": dict(BASE, layout="qwen3_moe", mlp_only_layers=[1], hidden_size=48, head_dim=12,
                            num_experts=10, experts_per_token=3, moe_intermediate_size=24)}
PROMPTS = ["The capital of France is", "Once upon a time there was a small robot", "def add(a, b):"]
LONG_PROMPT = 2100  # random token ids: chunked prefill (chunks of 1024 here) and split-KV decode


@torch.inference_mode()
def check_layout(name, spec, work, device, new_tokens):
    from transformers import AutoTokenizer

    ex = build_and_extract(spec, work)
    ckpt, cfg = ex.ckpt, ex.config
    tok = AutoTokenizer.from_pretrained(ckpt)
    refs = {}
    for impl in ("default", "eager"):
        try:
            m = load_native_model(ckpt, torch.device(device), torch.float32, None if impl == "default" else impl)
            cases = []
            long = torch.randint(16, cfg.vocab_size - 16, (1, LONG_PROMPT), generator=torch.Generator().manual_seed(2))
            for ids in [tok(text, return_tensors="pt").input_ids for text in PROMPTS] + [long]:
                ids = ids.to(device)
                full = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
                g = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
                cases.append(dict(ids=ids, full=full, tokens=g.sequences[0, ids.shape[1]:].tolist(),
                                  steps=torch.stack([l[0].float() for l in g.logits])))
            refs[impl] = dict(cases=cases, experts_implementation=getattr(m.config, "_experts_implementation", None))
            del m
        except Exception as err:
            refs[impl] = dict(error=f"{type(err).__name__}: {err}")
    out = {"spec": spec, "native": {k: {kk: vv for kk, vv in v.items() if kk != "cases"} for k, v in refs.items()}}
    # (name, capacity, kernels, load_runtime's other settings, decode path: None is the default, pipelined)
    variants = [(f"{c}_{k}", cap, kern, {}, None)
                for c, cap in (("all", None), ("top_k", cfg.experts_per_token), ("between", 6))
                for k, kern in (("kernels", True), ("torch", False))]
    variants += [("all_kernels_graph", None, True, {}, "graph"), ("between_kernels_graph", 6, True, {}, "graph"),
                 ("between_kernels_host_tier", 6, True, dict(host_tier=True), None),  # misses read in place
                 ("top_k_kernels_host_tier", cfg.experts_per_token, True, dict(host_tier=True), None),
                 ("between_kernels_host_copy", 6, True, dict(host_tier=True, in_place_misses=False), None),
                 ("unified_kernels", None, True, dict(unified=True), None)]
    for cap_name, cap, kern, settings, path in variants:
        rt = load_runtime(ex.dense, ex.dir, ckpt, capacity=cap, device=device, dtype=torch.float32,
                          use_kernels=kern, pin_memory=True, **settings)
        for impl, ref in refs.items():
            if "cases" not in ref:
                continue
            rows = []
            for case in ref["cases"]:
                ids = case["ids"]
                rt.model.setup_caches(1, ids.shape[1])
                prefill = rt.model.forward(ids, torch.arange(ids.shape[1], device=device))[0].float()
                g = generate(rt, ids, new_tokens, return_logits=True, path=path)
                steps = torch.stack([l[0] for l in g.logits]).to(device)
                rows.append(dict(tokens_identical=g.tokens[0] == case["tokens"],
                                 max_abs_diff_prefill=(prefill - case["full"]).abs().max().item(),
                                 max_abs_diff_steps=(steps - case["steps"]).abs().max().item(),
                                 logit_scale=case["full"].abs().max().item()))
            # a batch-2 call reallocates the KV cache; batch-1 decoding after it must still match (the
            # captured decode graph has to be recaptured, not replayed over freed buffers)
            ids = ref["cases"][0]["ids"]
            generate(rt, torch.cat([ids, ids]), 4)
            again = generate(rt, ids, new_tokens, path=path)
            rows.append(dict(tokens_identical=again.tokens[0] == ref["cases"][0]["tokens"], after_batch_2=True,
                             max_abs_diff_prefill=0.0, max_abs_diff_steps=0.0, logit_scale=0.0))
            out[f"ours_{cap_name}_vs_native_{impl}"] = dict(
                all_tokens_identical=all(r["tokens_identical"] for r in rows),
                max_abs_logit_diff=max(max(r["max_abs_diff_prefill"], r["max_abs_diff_steps"]) for r in rows),
                prompts=rows)
        rt.cache.close()
        del rt
    out["bf16_slots"] = bf16_slots(work, ckpt, device, new_tokens, refs["default"].get("cases", []))
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    return out


def bf16_slots(work, ckpt, device, new_tokens, cases) -> dict:
    """In bf16 (the files' dtype) a miss is two DMAs straight into the slot, or (host tier, in place) read
    by the kernels from pinned RAM and written into the slot: the same kernels over slots filled either
    way must give bit for bit the logits of every expert resident."""
    runs = {}
    for name, settings in (("all", dict(capacity=None)), ("between", dict(capacity=6)),
                           ("between_host_tier", dict(capacity=6, host_tier=True)),
                           ("between_host_copy", dict(capacity=6, host_tier=True, in_place_misses=False))):
        rt = load_runtime(work / "dense.safetensors", work, ckpt, device=device, dtype=torch.bfloat16,
                          pin_memory=True, **settings)
        runs[name] = [generate(rt, case["ids"], new_tokens, return_logits=True) for case in cases]
        runs[name + "_misses"] = sum(g.decode_stats["misses"] for g in runs[name])
        rt.cache.close()
    same = {name: all(g.tokens == a.tokens and all(torch.equal(x, y) for x, y in zip(g.logits, a.logits))
                      for g, a in zip(runs[name], runs["all"]))
            for name in ("between", "between_host_tier", "between_host_copy")}
    return {"identical_to_capacity_all": same, "decode_misses": {k: v for k, v in runs.items() if k.endswith("_misses")}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="which of them, comma-separated")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cache_policy.PREFILL_CHUNK = 1024  # several chunks in the long prompt
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 matmuls (also torch's default)
    torch.backends.cudnn.allow_tf32 = False
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": a.device,
              "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": "float32",
              "new_tokens": a.new_tokens, "layouts": {}}
    for name in a.layouts.split(","):
        spec = LAYOUTS[name]
        work = Path(tempfile.mkdtemp(prefix=f"parity.{name}."))
        try:
            result["layouts"][name] = check_layout(name, spec, work, a.device, a.new_tokens)
        except Exception as err:
            result["layouts"][name] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for name, r in result["layouts"].items():
        for k, v in r.items():
            if k.startswith("ours_") and "all_tokens_identical" in v:
                summary[f"{name}:{k}"] = {"tokens_identical": v["all_tokens_identical"],
                                          "max_abs_logit_diff": v["max_abs_logit_diff"]}
    result["summary"] = summary
    emit(result, a.out)


if __name__ == "__main__":
    main()
