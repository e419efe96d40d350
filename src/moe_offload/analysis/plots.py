"""The report's figures (matplotlib, written as PNG): fidelity against depth, hit rate against cache
capacity per policy with Belady's optimum as the ceiling, and memory and speed native vs selective."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import atomic_path  # noqa: E402

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
    ax2 = ax.twinx()
    ax2.plot(x, [max(d["fidelity"]["mean_kl"], 1e-12) for d in depths], "s--", color="tab:red", label="mean KL")
    ax2.set_yscale("log")
    ax2.set_ylabel("mean KL(native || ours)", color="tab:red")
    ax.set_title("Fidelity against depth (teacher-forced on native's tokens)")
    _save(fig, path)


def plot_hit_rate(profile_csv: pd.DataFrame, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, scope in zip(axes, ("per_layer", "global")):
        rows = profile_csv[profile_csv["scope"] == scope]
        for policy in ("belady", "lru", "lfu"):
            sub = rows[rows["policy"] == policy].sort_values("capacity")
            ax.plot(sub["capacity"], sub["hit_rate"], **STYLE[policy])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts per layer" if scope == "per_layer" else "experts in the global pool")
        ax.set_title(f"scope: {scope}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hit rate")
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(loc="lower right")
    fig.suptitle("Expert-cache hit rate against capacity (simulated on the full-depth router trace)")
    _save(fig, path)


def plot_memory_speed(native: dict, depths: list[dict], path, memory) -> None:
    """memory(run) -> dict with generate_peak_bytes and bound_bytes (compare.memory_summary)."""
    runs = [("native", native)] + [(f"depth {d['depth']}", d) for d in sorted(depths, key=lambda d: d["depth"])]
    labels = [name for name, _ in runs]
    mems = [memory(r) for _, r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    pos = range(len(runs))
    ax1.bar([p - 0.2 for p in pos], [m["generate_peak_bytes"] / 2**20 for m in mems], 0.4, label="measured peak")
    ax1.bar([p + 0.2 for p in pos], [m["bound_bytes"] / 2**20 for m in mems], 0.4, label="bound", alpha=0.6)
    ax1.set_xticks(list(pos), labels, rotation=30)
    ax1.set_ylabel("MiB during generation")
    ax1.set_title(f"Memory ({mems[0]['measure']})")
    ax1.legend()
    ax2.bar(list(pos), [r["tok_s"] for _, r in runs], color=["tab:gray"] + ["tab:blue"] * (len(runs) - 1))
    ax2.set_xticks(list(pos), labels, rotation=30)
    ax2.set_ylabel("decode tokens / s")
    ax2.set_title(f"Speed on {native['device']}")
    _save(fig, path)
