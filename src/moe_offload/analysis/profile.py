"""Expert-cache profile of a router trace: hit rates per policy, scope and capacity, and what they cost.

Answers "how much memory buys which hit rate, and how many bytes per token does the rest cost" from one
trace, with the same policies and access order the runtime uses (see cache_sim).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .cache_sim import POLICIES, SCOPES, access_sequence, expert_popularity, hit_flags, reuse_distances

CSV_COLUMNS = ["policy", "scope", "capacity", "hits", "misses", "hit_rate"]
QUANTILES = (0.5, 0.9, 0.99)


def default_capacities(experts_per_token: int, num_experts: int, num_layers: int = 1) -> list[int]:
    """top-k, 2k, 4k, ... up to all experts, ascending; times `num_layers` for a global pool."""
    if not 1 <= experts_per_token <= num_experts:
        raise ValueError(
            f"need 1 <= experts_per_token <= num_experts, got {experts_per_token}, {num_experts}"
        )
    caps, c = [], experts_per_token
    while c < num_experts:
        caps.append(c)
        c *= 2
    caps.append(num_experts)
    return sorted({c * num_layers for c in caps})


def _check_trace(trace: pd.DataFrame, num_experts: int, experts_per_token: int) -> None:
    lengths = trace["experts"].map(len)
    if (lengths != experts_per_token).any():
        raise ValueError(f"trace rows route to {sorted(set(lengths))} experts, expected {experts_per_token}")
    flat = np.concatenate([np.asarray(e) for e in trace["experts"]])
    if flat.min() < 0 or flat.max() >= num_experts:
        raise ValueError(
            f"trace expert indices span {flat.min()}..{flat.max()}, outside 0..{num_experts - 1}"
        )


def _reuse_summary(distances: list[float]) -> dict:
    d = np.asarray(distances)
    finite = d[np.isfinite(d)]
    # log2 bins: 0, 1, 2-3, 4-7, ...; the distance of a hit is what matters against a capacity
    hist: dict[str, int] = {}
    if finite.size:
        bins = np.where(finite < 1, 0, np.floor(np.log2(np.maximum(finite, 1))).astype(int) + 1)
        for b, n in zip(*np.unique(bins, return_counts=True)):
            lo, hi = (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)
            hist[f"{lo}" if lo == hi else f"{lo}-{hi}"] = int(n)
    return {
        "first_accesses": int(d.size - finite.size),
        "histogram": hist,
        "quantiles": {str(q): float(np.quantile(finite, q)) if finite.size else None for q in QUANTILES},
        "max": float(finite.max()) if finite.size else None,
    }


def profile_cache(
    trace_df: pd.DataFrame,
    capacities_per_layer: list[int],
    capacities_global: list[int],
    expert_bytes: int,
    num_experts: int,
    experts_per_token: int,
    hit_rate_target: float,
) -> tuple[pd.DataFrame, dict]:
    """Simulate every policy and scope at every capacity; return the CSV table and a JSON-able summary."""
    if trace_df.empty:
        raise ValueError("router trace is empty")
    _check_trace(trace_df, num_experts, experts_per_token)
    accesses = access_sequence(trace_df)
    layers = sorted({layer for layer, _ in accesses})
    layer_of = np.searchsorted(layers, [layer for layer, _ in accesses])
    per_layer_accesses = np.bincount(layer_of, minlength=len(layers))
    # Tokens that went through a forward call: prefill prompt tokens plus one per decode step.
    tokens = int(trace_df[["prompt", "step", "position"]].drop_duplicates().shape[0])

    rows, layer_rates, bytes_per_token = [], {}, {}
    for scope, caps in zip(SCOPES, (capacities_per_layer, capacities_global)):
        for policy in POLICIES:
            for cap in sorted(set(int(c) for c in caps)):
                flags = np.asarray(hit_flags(accesses, policy, scope, cap), dtype=bool)
                hits = int(flags.sum())
                misses = len(accesses) - hits
                rows.append((policy, scope, cap, hits, misses, hits / len(accesses)))
                bytes_per_token.setdefault(policy, {}).setdefault(scope, {})[str(cap)] = (
                    misses * expert_bytes / tokens
                )
                if scope == "per_layer":
                    layer_hits = np.bincount(layer_of, weights=flags, minlength=len(layers))
                    layer_rates.setdefault(policy, {})[str(cap)] = {
                        str(layer): float(h / n)
                        for layer, h, n in zip(layers, layer_hits, per_layer_accesses)
                    }
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)

    targets = {}
    for (policy, scope), group in table.groupby(["policy", "scope"], sort=False):
        reached = group[group["hit_rate"] >= hit_rate_target].sort_values("capacity")
        if reached.empty:
            targets.setdefault(policy, {})[scope] = None
            continue
        row = reached.iloc[0]
        slots = int(row["capacity"]) * (len(layers) if scope == "per_layer" else 1)
        targets.setdefault(policy, {})[scope] = {
            "capacity": int(row["capacity"]),
            "hit_rate": float(row["hit_rate"]),
            "memory_bytes": slots * expert_bytes,
        }

    popularity = {
        str(layer): [int(counts.get(e, 0)) for e in range(num_experts)]
        for layer, counts in expert_popularity(accesses).items()
    }
    summary = {
        "tokens": tokens,
        "tokens_counted": "prefill prompt tokens + decode-step tokens (distinct prompt, step, position)",
        "prompts": int(trace_df["prompt"].nunique()),
        "layers": layers,
        "accesses": len(accesses),
        "distinct_keys": len(set(accesses)),
        "num_experts": num_experts,
        "experts_per_token": experts_per_token,
        "expert_bytes": expert_bytes,
        "no_cache_bytes_per_token": len(accesses) * expert_bytes / tokens,
        "bytes_per_token": bytes_per_token,
        "per_layer_hit_rate": layer_rates,
        "expert_popularity": popularity,
        "expert_popularity_counts": "cache accesses: once per forward step in which any token chose the expert",
        "reuse_distance": {scope: _reuse_summary(reuse_distances(accesses, scope)) for scope in SCOPES},
        "hit_rate_target": hit_rate_target,
        "smallest_capacity_for_target": targets,
    }
    return table, summary


def recommend(summary: dict, layers: int) -> dict:
    """The cheapest online policy and scope that reaches the target, next to Belady's floor."""
    targets = summary["smallest_capacity_for_target"]
    online = [(t["memory_bytes"], policy, scope, t) for policy in ("lru", "lfu") for scope, t in targets[policy].items()
              if t is not None]
    if not online:
        return {"reached": False, "text": f"no simulated capacity of an online policy reaches hit rate "
                                          f"{summary['hit_rate_target']}: hold every expert or accept misses"}
    memory, policy, scope, best = min(online)
    floor = targets["belady"][scope]
    unit = "experts per layer" if scope == "per_layer" else f"experts in one pool for {layers} layers"
    return {"reached": True, "policy": policy, "scope": scope, "capacity": best["capacity"],
            "hit_rate": best["hit_rate"], "memory_bytes": memory,
            "belady_capacity": floor["capacity"] if floor else None,
            "text": f"{policy.upper()} with {best['capacity']} {unit} reaches hit rate {best['hit_rate']:.3f} "
                    f"holding {memory / 2**20:.1f} MiB of experts; Belady's optimum needs "
                    f"{floor['capacity'] if floor else '?'}"}


def modality_experts(trace_df: pd.DataFrame, prompt_ids: list[list[int]], kind_of_token: dict[int, str]) -> dict:
    """Which experts each modality's prompt tokens route to, per layer, and how far apart the sets are.

    A prompt token is `audio` or `image` when its id is that placeholder (the towers' output sits there),
    else `text`; generated tokens are left out (they are text whatever the prompt). Returns per modality
    the tokens and, per layer, the experts used; per pair of modalities, each layer's overlap (Jaccard:
    shared / either) and its mean over layers. A pair is there only when both modalities occur."""
    prefill = trace_df[trace_df["step"] == 0]
    used: dict[str, dict[int, set]] = {}
    tokens: dict[str, set] = {}
    for prompt, position, layer, experts in zip(prefill["prompt"], prefill["position"], prefill["layer"],
                                                prefill["experts"]):
        ids = prompt_ids[int(prompt)]
        kind = kind_of_token.get(ids[int(position)], "text") if int(position) < len(ids) else "text"
        used.setdefault(kind, {}).setdefault(int(layer), set()).update(int(e) for e in experts)
        tokens.setdefault(kind, set()).add((int(prompt), int(position)))
    kinds = sorted(used)
    overlap = {}
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            layers = sorted(set(used[a]) & set(used[b]))
            per_layer = {str(L): len(used[a][L] & used[b][L]) / len(used[a][L] | used[b][L]) for L in layers}
            overlap[f"{a}~{b}"] = {"per_layer": per_layer,
                                   "mean": float(np.mean(list(per_layer.values()))) if per_layer else None}
    return {"what": "prompt tokens by modality (placeholder ids of the towers' output vs text); overlap = "
                    "Jaccard of the experts each modality used, per layer",
            "tokens": {k: len(v) for k, v in tokens.items()},
            "experts": {k: {str(L): sorted(s) for L, s in sorted(v.items())} for k, v in used.items()},
            "overlap": overlap}
