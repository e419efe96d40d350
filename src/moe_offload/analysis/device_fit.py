"""What a model needs at each bit-width of its experts, and what that means on the machines its users have:
which fit every expert in memory, which need the expert cache (at what capacity), and the decode speed each
can reach at best (the bound: a token's bytes over the memory's read rate, plus, with a cache, its misses'
bytes over the link they come through).

  python -m moe_offload.analysis.device_fit            # the real Qwen3-Omni-30B-A3B thinker, as Markdown

Every figure is computed from the model's dimensions (resources.py), none measured here. Assumptions, said
in the table's notes: the OS keeps part of a unified-memory board's RAM; with a cache, routing is taken as
uniform (an LRU of C of E experts hits C / E: real Qwen3-30B-A3B routing is close to uniform,
BACKGROUND.md section 6), which is the pessimistic end; mixed precision's routed bytes are the hot fraction's
share of the experts, as under uniform routing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..checkpoint.layouts import TextConfig
from ..resources import bytes_read_per_token, dense_params, kv_bytes, quantized_expert_bytes

GB = 1e9


@dataclass(frozen=True)
class Machine:
    name: str
    memory_bytes: float  # what the model may use
    read_bytes_per_s: float  # memory the decode reads weights from
    link: str  # where experts that do not fit come from
    link_bytes_per_s: float


MACHINES = (
    # 8 GB LPDDR5 shared with the CPU and the OS (about 1.5 GB kept); experts past it from NVMe
    Machine("Jetson Orin Nano 8 GB", 6.5 * GB, 102 * GB, "NVMe", 2 * GB),
    # a 24 GB desktop card (RTX 4090: 1008 GB/s); experts past it from pinned host RAM over PCIe 4.0 x16
    Machine("24 GB desktop GPU (RTX 4090)", 23 * GB, 1008 * GB, "PCIe 4.0 x16", 25 * GB),
    # 128 GB LPDDR5X unified (122 GB for the GPU, BACKGROUND.md), 273 GB/s
    Machine("Jetson AGX Thor 128 GB", 122 * GB, 273 * GB, "NVMe", 5 * GB),
)


@dataclass(frozen=True)
class Scheme:
    """Experts at `bits`, or mixed: `hot_fraction` of each layer's experts at `hot_bits`, the rest at bits."""

    bits: int
    group_size: int = 128
    hot_bits: int | None = None
    hot_fraction: float = 0.0

    @property
    def name(self) -> str:
        if self.hot_bits is None:
            return "bf16" if self.bits == 16 else f"int{self.bits}"
        hot = "bf16" if self.hot_bits == 16 else f"int{self.hot_bits}"
        return f"mixed: {self.hot_fraction:.0%} {hot}, rest int{self.bits}"

    def expert_bytes(self, cfg: TextConfig) -> float:
        """One expert's bytes, averaged over a layer's experts (mixed: hot and cold in their shares)."""
        cold = quantized_expert_bytes(cfg, self.bits, self.group_size)
        if self.hot_bits is None:
            return cold
        hot = quantized_expert_bytes(cfg, self.hot_bits, self.group_size)
        return self.hot_fraction * hot + (1 - self.hot_fraction) * cold


SCHEMES = (Scheme(16), Scheme(8), Scheme(4), Scheme(4, hot_bits=8, hot_fraction=0.25),
           Scheme(4, hot_bits=16, hot_fraction=0.25))


def needs(cfg: TextConfig, scheme: Scheme, context: int) -> dict:
    """Bytes of the dense weights (bf16), of every expert at the scheme, and of the KV cache at `context`."""
    layers = len(cfg.expert_layers)
    expert = scheme.expert_bytes(cfg)
    return {"dense_bytes": dense_params(cfg) * 2, "experts_bytes": layers * cfg.num_experts * expert,
            "kv_bytes": kv_bytes(cfg, cfg.num_layers, context, "bfloat16"), "expert_bytes": expert,
            "token_bytes": bytes_read_per_token(cfg, cfg.num_layers, "bfloat16", expert)
            + kv_bytes(cfg, cfg.num_layers, context, "bfloat16")}


def fit(cfg: TextConfig, scheme: Scheme, machine: Machine, context: int = 4096) -> dict:
    """Where the scheme stands on the machine: every expert resident, or the per-layer cache capacity that
    fits (None: not even top-k per layer does), and the decode bound in tok/s."""
    n = needs(cfg, scheme, context)
    layers, k, experts = len(cfg.expert_layers), cfg.experts_per_token, cfg.num_experts
    room = machine.memory_bytes - n["dense_bytes"] - n["kv_bytes"]
    capacity = min(experts, int(room // (layers * n["expert_bytes"]))) if room > 0 else 0
    row = {"machine": machine.name, "scheme": scheme.name, **n, "total_bytes": n["dense_bytes"] + n["experts_bytes"]
           + n["kv_bytes"], "capacity": capacity if capacity >= k else None, "resident": capacity == experts}
    if row["capacity"] is None:
        row["tok_s_bound"] = None
        return row
    seconds = n["token_bytes"] / machine.read_bytes_per_s
    misses = layers * k * (1 - capacity / experts)  # an LRU of C of E under uniform routing hits C / E
    seconds += misses * n["expert_bytes"] / machine.link_bytes_per_s
    row.update(misses_per_token=misses, tok_s_bound=1 / seconds)
    return row


def table(cfg: TextConfig, context: int = 4096) -> str:
    """Markdown: a row per scheme with its memory, then per machine whether it fits and its bound."""
    lines = ["| experts | weights GB (dense + experts) | KV GB at %d tokens | per token GB | %s |" % (
        context, " | ".join(m.name for m in MACHINES)), "|" + "---|" * (4 + len(MACHINES))]
    for scheme in SCHEMES:
        cells = []
        for machine in MACHINES:
            r = fit(cfg, scheme, machine, context)
            if r["capacity"] is None:
                cells.append("does not fit (not even top-k per layer)")
            elif r["resident"]:
                cells.append(f"all resident, ≤ {r['tok_s_bound']:.0f} tok/s")
            else:
                cells.append(f"cache {r['capacity']}/{cfg.num_experts} per layer, ≤ {r['tok_s_bound']:.1f} tok/s "
                             f"({r['misses_per_token']:.0f} misses/token over {machine.link})")
        n = needs(cfg, scheme, context)
        lines.append(f"| {scheme.name} | {(n['dense_bytes'] + n['experts_bytes']) / GB:.1f} "
                     f"({n['dense_bytes'] / GB:.1f} + {n['experts_bytes'] / GB:.1f}) | {n['kv_bytes'] / GB:.2f} | "
                     f"{n['token_bytes'] / GB:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from ..checkpoint.dims import THINKER_TEXT
    from ..checkpoint.layouts import text_config_from_dict

    sys.stdout.write(table(text_config_from_dict(THINKER_TEXT)) + "\n")


if __name__ == "__main__":
    main()
