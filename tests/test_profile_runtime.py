"""The cache simulator replays the runtime's router trace and counts exactly the runtime's hits and misses."""

from __future__ import annotations

import pandas as pd
import pytest
from transformers import AutoTokenizer

from moe_offload.analysis.cache_sim import access_sequence, simulate
from moe_offload.runtime.generate import generate, load_runtime
from moe_offload.runtime.trace import TRACE_COLUMNS
from moe_offload.analysis.profile import default_capacities, profile_cache

PROMPTS = ["The capital of France is", "Once upon a time there was a small robot", "Write a short poem about the moon"]


@pytest.fixture(scope="module")
def extracted(omni_extracted):
    return omni_extracted.ckpt, omni_extracted.dir, omni_extracted.config


def _run(extracted, capacity, scope, policy="lru", path=None):
    ckpt, out, _ = extracted
    rt = load_runtime(out / "dense.safetensors", out, ckpt, capacity=capacity, scope=scope, policy=policy)
    tok = AutoTokenizer.from_pretrained(ckpt)
    for i, text in enumerate(PROMPTS):  # one cache across prompts, as the workflow's depth runs do
        generate(rt, tok(text)["input_ids"], 12, prompt=i, path=path)
    return rt.cache.stats(), pd.DataFrame(rt.model.trace.rows, columns=list(TRACE_COLUMNS))


@pytest.mark.parametrize("scope, capacity", [("per_layer", 4), ("per_layer", 7), ("global", 40), ("global", 100)])
@pytest.mark.parametrize("policy, path", [("lru", "careful"), ("lru", "graph"), ("lru", "pipelined"),
                                          ("lfu", None)])
def test_simulation_equals_runtime_counters(extracted, scope, capacity, policy, path):
    """Also with the graph and pipelined decode steps (CUDA's), whose counters come from replaying
    each step's accesses after the fact (a step launched ahead of a miss is discarded unseen)."""
    counted, trace = _run(extracted, capacity, scope, policy, path)
    simulated = simulate(access_sequence(trace), policy, scope, capacity)
    assert counted["misses"] > 0 and counted["hits"] > 0
    assert (simulated["hits"], simulated["misses"]) == (counted["hits"], counted["misses"])


def test_profile_of_a_runtime_trace_puts_belady_on_top(extracted):
    _, _, cfg = extracted
    _, trace = _run(extracted, cfg.num_experts, "per_layer")
    caps = default_capacities(cfg.experts_per_token, cfg.num_experts)
    table, summary = profile_cache(trace, caps, [c * len(cfg.expert_layers) for c in caps], cfg.expert_bytes,
                                   cfg.num_experts, cfg.experts_per_token, 0.9)
    for (scope, capacity), group in table.groupby(["scope", "capacity"]):
        rates = dict(zip(group["policy"], group["hit_rate"]))
        assert rates["belady"] >= rates["lru"] and rates["belady"] >= rates["lfu"], (scope, capacity)
    assert summary["tokens"] == trace[["prompt", "step", "position"]].drop_duplicates().shape[0]


def test_recommendation_picks_the_cheapest_online_policy_reaching_the_target():
    from moe_offload.analysis.profile import recommend

    hit = lambda c, r, m: {"capacity": c, "hit_rate": r, "memory_bytes": m}  # noqa: E731
    summary = {"hit_rate_target": 0.9, "smallest_capacity_for_target": {
        "lru": {"per_layer": hit(8, 0.91, 800), "global": hit(300, 0.92, 300)},
        "lfu": {"per_layer": None, "global": None},
        "belady": {"per_layer": hit(4, 0.95, 400), "global": hit(100, 0.9, 100)}}}
    rec = recommend(summary, 48)
    assert (rec["policy"], rec["scope"], rec["capacity"], rec["belady_capacity"]) == ("lru", "global", 300, 100)
    summary["smallest_capacity_for_target"]["lru"] = {"per_layer": None, "global": None}
    assert recommend(summary, 48)["reached"] is False
