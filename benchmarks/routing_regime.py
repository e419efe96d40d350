"""How strongly routing follows the token, against the synthetic checkpoint's embedding scale: per-layer LRU
hit rates of sampled decoding at several capacities, from one build (prints JSON).

Random-weight checkpoints route with far more reuse than real ones (issue 7, item 3). Scaling the token
embeddings (`embed_scale` in the synthetic spec) makes each token's routing follow the token; this finds
the scale that brings the hit rate at 25% capacity to a real model's (<= 0.6) at the dims asked for. The
scale is applied to the loaded runtime's embedding (the only tensor `embed_scale` changes), so one build
serves every scale; the rates come from replaying each run's router trace through the cache simulator.

  PYTHONPATH=src python3 benchmarks/routing_regime.py --dims real --layers 16 --device cuda --scales 1,30,100,300
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import PROMPT, emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

from moe_offload.analysis.cache_sim import access_sequence, hit_flags  # noqa: E402
from moe_offload.checkpoint.dims import DIMS, spec as dims_spec  # noqa: E402
from moe_offload.checkpoint.extracted import build_and_extract  # noqa: E402
from moe_offload.runtime.generate import generate, load_runtime  # noqa: E402
from moe_offload.runtime.trace import TRACE_COLUMNS  # noqa: E402


def decode_hit_rate(trace: list[dict], capacity: int) -> float:
    """LRU hit rate, per layer at `capacity`, of the decode steps' accesses (the prefill warms the cache)."""
    df = pd.DataFrame(trace, columns=TRACE_COLUMNS)
    flags = hit_flags(access_sequence(df), "lru", "per_layer", capacity)
    decode = flags[len(access_sequence(df[df.step == 0])):]
    return sum(decode) / len(decode)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scales", default="1,4,10,30,100")
    p.add_argument("--capacities", default=None, help="default: 1/16, 1/8, 1/4, 1/2 of the experts")
    p.add_argument("--runs", type=int, default=3, help="sampled generations per scale (seeds 0..)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="routing."))
    try:
        ex = build_and_extract(dims_spec(a.dims, a.layers), work)
        ckpt, cfg = ex.ckpt, ex.config
        e = cfg.num_experts
        capacities = [int(c) for c in a.capacities.split(",")] if a.capacities else [e // 16, e // 8, e // 4, e // 2]
        rt = load_runtime(ex.dense, ex.dir, ckpt, device=a.device)
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(ckpt)(PROMPT).input_ids
        base, rows = rt.model.embed.clone(), []
        for scale in [float(s) for s in a.scales.split(",")]:
            rt.model.embed.copy_(base * scale)  # in place: captured graphs read this very tensor
            traces = [generate(rt, ids, a.max_new_tokens, temperature=1.0, seed=i).trace for i in range(a.runs)]
            rates = {c: sum(decode_hit_rate(t, c) for t in traces) / len(traces) for c in capacities}
            distinct = len({tuple(r["experts"]) for t in traces for r in t if r["step"] > 0}) / sum(
                1 for t in traces for r in t if r["step"] > 0)
            rows.append(dict(embed_scale=scale, lru_hit_rate_per_capacity=rates, distinct_routings_fraction=distinct))
            print(f"# scale {scale}: " + ", ".join(f"cap {c}: {r:.2f}" for c, r in rates.items()), file=sys.stderr,
                  flush=True)
    finally:  # the real dims take tens of GB of disk
        shutil.rmtree(work, ignore_errors=True)
    emit({"command": " ".join([Path(sys.executable).name] + sys.argv), "device": a.device, "dims": a.dims,
          "layers": a.layers, "experts": e, "experts_per_token": cfg.experts_per_token, "runs": a.runs,
          "max_new_tokens": a.max_new_tokens, "decoding": "sampled, temperature 1", "rows": rows}, a.out)


if __name__ == "__main__":
    main()
