"""The report's figures (matplotlib, written as PNG): fidelity against depth, hit rate against cache
capacity per policy with Belady's optimum as the ceiling, and memory and speed native vs selective."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import atomic_path  # noqa: E402
from .run_fields import expert_scheme  # noqa: E402

STYLE = {"belady": dict(color="black", linestyle="--", marker="", label="Belady (optimal, ceiling)"),
         "lru": dict(color="tab:blue", marker="o", label="LRU"),
         "lfu": dict(color="tab:orange", marker="s", label="LFU")}


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_fidelity(native: dict, depths: list[dict], path) -> None:
    depths = sorted(depths, key=lambda d: d["depth"])
    x = [d["depth"] for d in depths]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [d["fidelity"]["top1_agreement"] for d in depths], "o-", color="tab:green", label="top-1 agreement")
    ax.set_xlabel("decoder layers run (depth)")
    ax.set_ylabel("top-1 agreement with native", color="tab:green")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(x)
    ax2 = ax.twinx()
    ax2.plot(x, [max(d["fidelity"]["mean_kl"], 1e-12) for d in depths], "s--", color="tab:red",
             label="mean KL(native || ours), nats")
    ax2.set_yscale("log")
    ax2.set_ylabel("mean KL per token (nats, log scale)", color="tab:red")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("Fidelity against depth (teacher-forced on native's tokens)")
    _save(fig, path)


def plot_quality_bytes(depths: list[dict], path) -> None:
    """Fidelity against the bytes one decoded token reads, a line per bit-width through its depths: what
    each byte saved (fewer layers, fewer bits) costs in agreement with native."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for scheme in dict.fromkeys(expert_scheme(d) for d in depths):  # in the order the runs come
        runs = sorted((d for d in depths if expert_scheme(d) == scheme), key=lambda d: d["depth"])
        x = [d["speed_bound"]["bytes_read_per_token"] / 2**20 for d in runs]
        label = f"{scheme} experts"
        axes[0].plot(x, [d["fidelity"]["top1_agreement"] for d in runs], "o-", label=label)
        axes[1].plot(x, [max(d["fidelity"]["mean_kl"], 1e-12) for d in runs], "s-", label=label)
        for d, xi in zip(runs, x):
            axes[0].annotate(str(d["depth"]), (xi, d["fidelity"]["top1_agreement"]), fontsize=7,
                             textcoords="offset points", xytext=(3, 3))
    axes[0].set_ylabel("top-1 agreement with native")
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("mean KL(native || ours), nats")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("MiB read per decoded token (weights + KV)")
        ax.legend(loc="best")
    fig.suptitle("Quality against bytes read per token (labels: depth)")
    _save(fig, path)


def plot_hit_rate(profile_csv: pd.DataFrame, path, target: float | None = None,
                  recommendation: dict | None = None) -> None:
    """recommendation: profile.json's (policy, scope, capacity when reached), marked on its panel."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    titles = {"per_layer": "one cache per layer", "global": "one pool for all layers"}
    for ax, scope in zip(axes, ("per_layer", "global")):
        rows = profile_csv[profile_csv["scope"] == scope]
        for policy in ("belady", "lru", "lfu"):
            sub = rows[rows["policy"] == policy].sort_values("capacity")
            ax.plot(sub["capacity"], sub["hit_rate"], **STYLE[policy])
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle=":", label=f"target hit rate {target:g}")
        rec = recommendation or {}
        if rec.get("reached") and rec.get("scope") == scope:
            ax.axvline(rec["capacity"], color="tab:green", linestyle="-.", alpha=0.8,
                       label=f"recommended: {rec['policy'].upper()}, {rec['capacity']} experts")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache capacity (experts per layer)" if scope == "per_layer"
                      else "cache capacity (experts in the pool)")
        ax.set_title(titles[scope])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    axes[0].set_ylabel("hit rate (fraction of expert requests)")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle("Expert-cache hit rate against capacity (simulated on the full-depth router trace)")
    _save(fig, path)


def plot_memory_speed(native: dict, depths: list[dict], path, memory) -> None:
    """memory(run) -> dict with generate_peak_bytes and bound_bytes (analysis.memory_summary)."""
    full = max(d["depth"] for d in depths)
    runs = [("native", native)] + [(f"depth {d['depth']}" + (" (full)" if d["depth"] == full else ""), d)
                                   for d in sorted(depths, key=lambda d: d["depth"])]
    labels = [name for name, _ in runs]
    mems = [memory(r) for _, r in runs]
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 3.8))
    pos = range(len(runs))
    ax1.bar([p - 0.2 for p in pos], [m["generate_peak_bytes"] / 2**20 for m in mems], 0.4, label="measured peak")
    ax1.bar([p + 0.2 for p in pos], [m["bound_bytes"] / 2**20 for m in mems], 0.4, label="bound", alpha=0.6)
    ax1.set_xticks(list(pos), labels, rotation=30)
    ax1.set_ylabel("MiB during generation (model's own)")
    measure = {"rss_over_baseline": "process RSS over its baseline after imports",
               "cuda_max_allocated": "CUDA max allocated"}[mems[0]["measure"]]
    ax1.set_title(f"Memory: {measure}", fontsize="medium")
    ax1.legend()
    kinds = ["native"] + ["selective, full depth" if d["depth"] == full else "selective, truncated (fewer layers)"
                          for _, d in runs[1:]]
    colors = {"native": "tab:gray", "selective, full depth": "tab:blue",
              "selective, truncated (fewer layers)": "lightsteelblue"}
    # each speed next to its bound, from the rates probed in the run's own job
    for ax, key, bound_key, bound_label, what in (
            (ax3, "prefill_tok_s", "prefill_tok_s_bound", "matmul bound", "prefill (prompt) tokens / s"),
            (ax2, "tok_s", "tok_s_bound", "memory-read bound", "decode tokens / s (prefill excluded)")):
        for kind, color in colors.items():
            xs = [p for p, k in zip(pos, kinds) if k == kind]
            ax.bar(xs, [runs[p][1][key] for p in xs], color=color, label=kind)
        ax.scatter(list(pos), [r["speed_bound"][bound_key] for _, r in runs], marker="_", s=400, color="black",
                   label=bound_label)
        ax.set_yscale("log")
        ax.set_xticks(list(pos), labels, rotation=30)
        ax.set_ylabel(what)
        ax.legend(fontsize="small")
    ax3.set_title(f"Prefill speed on {native['device']}", fontsize="medium")
    ax2.set_title(f"Decode speed on {native['device']}", fontsize="medium")
    _save(fig, path)
