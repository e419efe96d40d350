"""The bounds of generate_speed.py's runs of ours, from a result's own fields: resident runs against the HBM
probe, offloaded ones against the resident step plus their misses over the link. generate_speed.py adds
them to its result; run alone, this applies the current definitions to a stored result, rewrites its
"bound" and prints it:

  python benchmarks/speed_bounds.py benchmarks/results/generate_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_offload.resources import dtype_size  # noqa: E402
from common import emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)


def bounds(result: dict) -> dict:
    """Each run of ours against the bound measured in the same run, from the result's own fields only (so
    that these definitions can be applied to a stored result).

    Resident: bytes per token over the HBM probe. Offloaded: the resident step (ours_full's time) plus
    each miss's bytes over the link, with the rate of the way the run moves them (pinned DMA copies, or
    for in-place misses the kernels' reads of pinned RAM: the zero-copy probe); and, where transfers run
    while the GPU computes (in-place misses, prefetch), also the larger of the two instead of their sum
    (overlap bound), which no run can beat.
    """
    runs, spec = result["runs"], result["spec"]
    bw = result["hbm_probe"]["bytes_per_second"]
    h2d = result["h2d_probe"]["bytes_per_second"]
    zero_copy = result.get("zero_copy_probe", {}).get("bytes_per_second")
    expert_bytes = result["expert_bytes_bf16"] // 2 * dtype_size(result["dtype"])
    k, n_moe = spec["experts_per_token"], spec["num_layers"] - len(spec.get("mlp_only_layers", []))
    steps = max(result["max_new_tokens"] - 1, 1)
    resident_s = 1 / runs["ours_full"]["tok_s"] if runs.get("ours_full", {}).get("tok_s") else None
    out = {}
    for label, r in runs.items():
        if "bytes_per_token" not in r:
            continue
        s = r["decode_stats_last_run"]
        misses = s["misses"] / steps
        entry = {"hbm_bound_tok_s": bw / r["bytes_per_token"], "misses_per_token": misses, "hit_rate": s["hit_rate"]}
        if r.get("unified_memory"):  # the routed experts read in place over the bus, the rest from HBM
            over_bus = n_moe * k * expert_bytes
            entry["unified_bound_tok_s"] = 1 / ((r["bytes_per_token"] - over_bus) / bw + over_bus / zero_copy)
            entry["fraction_of_unified_bound"] = r["tok_s"] / entry["unified_bound_tok_s"]
        elif misses == 0:
            entry["fraction_of_hbm_bound"] = r["tok_s"] / entry["hbm_bound_tok_s"]
        elif resident_s:
            used = s["prefetch_used"] / steps if r.get("prefetch") else 0.0  # misses the lookahead hid
            if r.get("prefetch"):
                entry.update(misses_hidden_per_token=used, prefetched_per_token=s["prefetched"] / steps,
                             prefetch_precision=s["prefetch_used"] / s["prefetched"] if s["prefetched"] else None,
                             prefetch_recall=used / (used + misses) if used + misses else None)
            link = zero_copy if r.get("in_place_misses") and zero_copy else h2d
            transfers = (misses + used) * expert_bytes / link
            entry.update(link="zero-copy reads" if link is not h2d else "pinned DMA copies", link_bytes_per_second=link,
                         offload_bound_tok_s=1 / (resident_s + transfers))
            if r.get("prefetch"):  # as the issue defines it with prefetch: the larger of the two
                entry["offload_bound_tok_s"] = 1 / max(resident_s, transfers)
            entry["fraction_of_offload_bound"] = r["tok_s"] / entry["offload_bound_tok_s"]
            if r.get("in_place_misses") or r.get("prefetch"):
                entry["overlap_bound_tok_s"] = 1 / max(resident_s, transfers)
                entry["fraction_of_overlap_bound"] = r["tok_s"] / entry["overlap_bound_tok_s"]
        out[label] = entry
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a generate_speed.py JSON with hbm_probe (a CUDA run); rewritten in place")
    a = p.parse_args()
    path = Path(a.result)
    result = json.loads(path.read_text())
    result["bound"] = bounds(result)
    result["bound_recomputed_by"] = " ".join([Path(sys.executable).name] + sys.argv)
    path.write_text(json.dumps(result, indent=1) + "\n")
    emit(result["bound"], None)


if __name__ == "__main__":
    main()
