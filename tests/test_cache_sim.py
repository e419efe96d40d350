"""Cache simulator and profile: hand-computed sequences, brute-force checks and properties on random traces."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from moe_offload.runtime.cache_policy import Scoped
from moe_offload.analysis.cache_sim import (
    POLICIES,
    SCOPES,
    access_sequence,
    expert_popularity,
    hit_flags,
    reuse_distances,
    simulate,
)
from moe_offload.analysis.profile import CSV_COLUMNS, default_capacities, profile_cache


def one_layer(experts):
    return [(0, e) for e in experts]


def hits(accesses, policy, scope, capacity):
    return simulate(accesses, policy, scope, capacity)["hits"]


# --- hand-computed ----------------------------------------------------------------------------------

# Classic Belady example, capacity 3: MIN misses 7 of 12, LRU and LFU miss 10.
CLASSIC = one_layer([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5])
# Capacity 2: LRU keeps the 2/3 pair (m h h m m h h m), LFU keeps the thrice-used 1 (m h h m m m m h).
FREQ = one_layer([1, 1, 1, 2, 3, 2, 3, 1])


@pytest.mark.parametrize(
    "accesses, capacity, expected",
    [
        (CLASSIC, 3, {"lru": 2, "lfu": 2, "belady": 5}),
        (CLASSIC, 4, {"lru": 4, "lfu": 4, "belady": 6}),
        (FREQ, 2, {"lru": 4, "lfu": 3, "belady": 4}),
        (one_layer([1, 2, 1, 3, 2, 1]), 2, {"lru": 1, "lfu": 2, "belady": 2}),
        (one_layer([1, 2, 1, 2]), 1, {"lru": 0, "lfu": 0, "belady": 0}),
    ],
)
def test_hand_computed_hits(accesses, capacity, expected):
    for scope in SCOPES:  # one layer: both scopes are the same pool
        assert {p: hits(accesses, p, scope, capacity) for p in POLICIES} == expected


def test_scopes_differ_across_layers():
    acc = [(0, 1), (1, 1), (0, 1), (1, 1), (0, 2), (0, 1)]
    # per layer, one slot each: layer 0 sees 1 1 2 1 (1 hit), layer 1 sees 1 1 (1 hit)
    for p in POLICIES:
        assert hits(acc, p, "per_layer", 1) == 2
        assert hits(acc, p, "global", 1) == 0
    # global pool of 2: (0,1),(1,1) both fit, then (0,2) evicts; MIN evicts (1,1), never used again
    assert hits(acc, "belady", "global", 2) == 3
    assert hits(acc, "lru", "global", 2) == 2


def test_unknown_policy_scope_capacity():
    for bad in [("fifo", "global", 2), ("lru", "node", 2), ("belady", "global", 0)]:
        with pytest.raises(ValueError):
            simulate(CLASSIC, *bad)


def test_reuse_distances_hand_computed():
    acc = [(0, 1), (0, 2), (1, 7), (0, 1), (0, 1), (0, 2)]
    inf = math.inf
    assert reuse_distances(acc, "global") == [inf, inf, inf, 2, 0, 2]
    assert reuse_distances(acc, "per_layer") == [inf, inf, inf, 1, 0, 1]


# --- access order -----------------------------------------------------------------------------------


def trace_rows(rows):
    return pd.DataFrame(rows, columns=["prompt", "step", "position", "layer", "experts", "weights"])


def test_access_sequence_order(tmp_path):
    w = [0.5, 0.5]
    rows = [
        # prompt 0, prefill of 2 tokens: layer 0 then layer 1
        (0, 0, 0, 0, [3, 1], w), (0, 0, 1, 0, [1, 2], w),
        (0, 0, 0, 1, [0, 5], w), (0, 0, 1, 1, [5, 4], w),
        # decode step
        (0, 1, 2, 0, [2, 0], w), (0, 1, 2, 1, [1, 3], w),
        # prompt 1 shares the cache: its keys follow
        (1, 0, 0, 0, [4, 1], w), (1, 0, 0, 1, [2, 0], w),
    ]  # fmt: skip
    expected = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 4), (1, 5), (0, 0), (0, 2), (1, 1), (1, 3),
                (0, 1), (0, 4), (1, 0), (1, 2)]  # fmt: skip
    df = trace_rows(rows)
    assert access_sequence(df) == expected
    # rows out of execution order are put back in it
    assert access_sequence(df.sample(frac=1, random_state=0)) == expected
    # through parquet the lists come back as arrays; keys are still plain ints
    df.to_parquet(tmp_path / "t.parquet")
    keys = access_sequence(pd.read_parquet(tmp_path / "t.parquet"))
    assert keys == expected and all(type(x) is int for k in keys for x in k)
    assert expert_popularity(keys) == {
        0: {1: 2, 2: 2, 3: 1, 0: 1, 4: 1},
        1: {0: 2, 4: 1, 5: 1, 1: 1, 3: 1, 2: 1},
    }


# --- random traces ----------------------------------------------------------------------------------


def random_trace(seed, layers=3, experts=8, k=2, prompts=2, prompt_len=3, decode=6):
    """Router trace with skewed expert choice (some experts popular), prefill + decode per prompt."""
    rng = np.random.default_rng(seed)
    pref = rng.dirichlet(np.full(experts, 0.5), size=layers)
    rows = []
    for p in range(prompts):
        for step in range(decode + 1):
            positions = range(prompt_len) if step == 0 else [prompt_len + step - 1]
            for layer in range(layers):
                for pos in positions:
                    chosen = rng.choice(experts, size=k, replace=False, p=pref[layer]).tolist()
                    rows.append((p, step, pos, layer, chosen, [1.0 / k] * k))
    return trace_rows(rows)


def distinct_per_pool(accesses, scope):
    if scope == "global":
        return len(set(accesses))
    return max(sum(1 for key in set(accesses) if key[0] == layer) for layer in {a[0] for a in accesses})


def optimal_hits(keys, capacity):
    """Exhaustive demand paging: best hits over every eviction choice (tiny inputs only)."""
    best = {frozenset(): 0}  # resident set -> most hits reaching it
    for key in keys:
        nxt = {}
        for state, h in best.items():
            if key in state:
                cands = [(state, h + 1)]
            elif len(state) < capacity:
                cands = [(state | {key}, h)]
            else:
                cands = [((state - {v}) | {key}, h) for v in state]
            for s, hh in cands:
                nxt[s] = max(nxt.get(s, -1), hh)
        best = nxt
    return max(best.values())


SEEDS = range(60)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_trace_properties(seed):
    acc = access_sequence(random_trace(seed, layers=1 + seed % 3, experts=4 + seed % 7, k=1 + seed % 3))
    for scope in SCOPES:
        distinct = distinct_per_pool(acc, scope)
        dist = reuse_distances(acc, scope)
        prev_belady = -1
        for cap in range(1, distinct + 2):
            counts = {p: simulate(acc, p, scope, cap) for p in POLICIES}
            for c in counts.values():
                assert c["hits"] + c["misses"] == len(acc)
            assert counts["belady"]["hits"] >= counts["lru"]["hits"]
            assert counts["belady"]["hits"] >= counts["lfu"]["hits"]
            assert counts["belady"]["hits"] >= prev_belady
            prev_belady = counts["belady"]["hits"]
            # LRU is a stack algorithm: it hits exactly the accesses whose reuse distance fits
            assert counts["lru"]["hits"] == sum(d < cap for d in dist)
            if cap >= distinct:
                for c in counts.values():
                    assert c["misses"] == len(set(acc))


@pytest.mark.parametrize("seed", range(40))
def test_belady_matches_exhaustive_optimum(seed):
    rng = random.Random(seed)
    keys = one_layer([rng.randrange(5) for _ in range(rng.randrange(4, 13))])
    for cap in (1, 2, 3):
        assert hits(keys, "belady", "global", cap) == optimal_hits([k[1] for k in keys], cap)


@pytest.mark.parametrize("seed", range(20))
def test_reuse_distance_matches_brute_force(seed):
    rng = random.Random(seed)
    acc = [(rng.randrange(2), rng.randrange(6)) for _ in range(40)]
    for scope in SCOPES:
        pool = (lambda k: k[0]) if scope == "per_layer" else (lambda k: None)
        expected = []
        for i, key in enumerate(acc):
            prev = [j for j in range(i) if acc[j] == key]
            between = {acc[j] for j in range(prev[-1] + 1, i) if pool(acc[j]) == pool(key)} if prev else None
            expected.append(math.inf if between is None else len(between))
        assert reuse_distances(acc, scope) == expected


def test_online_policies_are_the_runtime_objects():
    acc = access_sequence(random_trace(7))
    for policy in ("lru", "lfu"):
        for scope in SCOPES:
            cache = Scoped(policy, scope, 3)
            assert hit_flags(acc, policy, scope, 3) == [cache.access(k)[0] for k in acc]


# --- profile ----------------------------------------------------------------------------------------


def test_default_capacities():
    assert default_capacities(8, 128) == [8, 16, 32, 64, 128]
    assert default_capacities(6, 60) == [6, 12, 24, 48, 60]
    assert default_capacities(2, 8, num_layers=3) == [6, 12, 24]
    assert default_capacities(4, 4) == [4]
    with pytest.raises(ValueError):
        default_capacities(0, 8)


def test_profile_hand_made_target():
    # one layer, top-1, alternating 0 1 0 1 ...: nothing hits with 1 slot, everything but the first two with 2
    n = 10
    rows = [(0, 0, 0, 0, [0], [1.0])] + [(0, s, s, 0, [s % 2], [1.0]) for s in range(1, n)]
    table, summary = profile_cache(trace_rows(rows), [1, 2, 4], [1, 2], 100, 4, 1, 0.5)
    assert list(table.columns) == CSV_COLUMNS
    assert len(table) == len(POLICIES) * 5
    assert set(table.query("capacity == 1")["hits"]) == {0}
    assert set(table.query("capacity == 2")["hits"]) == {n - 2}
    for policy in POLICIES:
        for scope in SCOPES:
            assert summary["smallest_capacity_for_target"][policy][scope] == {
                "capacity": 2, "hit_rate": (n - 2) / n, "memory_bytes": 200,
            }  # fmt: skip
    assert summary["tokens"] == n
    assert summary["bytes_per_token"]["lru"]["per_layer"] == {"1": 100.0, "2": 20.0, "4": 20.0}
    assert summary["expert_popularity"] == {"0": [5, 5, 0, 0]}
    assert summary["reuse_distance"]["global"]["first_accesses"] == 2
    assert summary["reuse_distance"]["global"]["histogram"] == {"1": n - 2}


def test_profile_random_trace():
    layers, experts, k = 3, 8, 2
    df = random_trace(3, layers=layers, experts=experts, k=k)
    caps_l, caps_g = default_capacities(k, experts), default_capacities(k, experts, layers)
    table, summary = profile_cache(df, caps_l, caps_g, 1000, experts, k, 0.6)
    json.dumps(summary, allow_nan=False)
    assert list(table.columns) == CSV_COLUMNS
    assert len(table) == len(POLICIES) * (len(caps_l) + len(caps_g))
    assert (table["hits"] + table["misses"] == summary["accesses"]).all()
    for (policy, scope), group in table.groupby(["policy", "scope"]):
        reached = group[group["hit_rate"] >= 0.6]
        got = summary["smallest_capacity_for_target"][policy][scope]
        if reached.empty:
            assert got is None
        else:
            cap = int(reached["capacity"].min())
            assert got["capacity"] == cap
            assert got["memory_bytes"] == cap * 1000 * (layers if scope == "per_layer" else 1)
    rates = summary["per_layer_hit_rate"]
    assert set(rates) == set(POLICIES) and set(rates["lru"]) == {str(c) for c in caps_l}
    assert set(rates["lru"]["2"]) == {"0", "1", "2"}
    assert all(sum(v) > 0 for v in summary["expert_popularity"].values())
    none = profile_cache(df, caps_l, caps_g, 1000, experts, k, 1.01)[1]["smallest_capacity_for_target"]
    assert all(v is None for by_scope in none.values() for v in by_scope.values())


def test_profile_rejects_mismatched_trace():
    df = random_trace(0, experts=8, k=2)
    with pytest.raises(ValueError):
        profile_cache(df, [2], [2], 1, 8, 3, 0.5)  # wrong top-k
    with pytest.raises(ValueError):
        profile_cache(df, [2], [2], 1, 4, 2, 0.5)  # expert indices beyond num_experts


def test_lfu_heap_matches_a_brute_force_lfu():
    """cache_policy.LFU evicts in O(log n); a plain scan over residents must agree on every access."""
    import random as _random

    from moe_offload.runtime.cache_policy import LFU

    rng = _random.Random(7)
    for _ in range(30):
        capacity = rng.randint(1, 12)
        keys = [rng.choice(range(rng.randint(2, 30))) for _ in range(rng.randint(50, 400))]
        fast, count, resident = LFU(capacity), {}, []  # resident: least recently used first
        for key in keys:
            count[key] = count.get(key, 0) + 1
            hit, evicted = key in resident, None
            if hit:
                resident.remove(key)
            elif len(resident) >= capacity:
                evicted = min(resident, key=count.__getitem__)
                resident.remove(evicted)
            resident.append(key)
            assert fast.access(key) == (hit, evicted)


def test_modality_expert_sets_and_their_overlap():
    """Prompt tokens grouped by placeholder id (audio 7, image 8, else text); decode rows left out; the
    overlap per layer is shared / either of the experts each modality used."""
    import pandas as pd

    from moe_offload.analysis.profile import modality_experts

    ids = [[1, 7, 7, 2], [8, 8, 3]]
    rows = [  # prompt, step, position, layer, experts, weights
        (0, 0, 0, 0, [0, 1], [0.5, 0.5]), (0, 0, 1, 0, [1, 2], [0.5, 0.5]), (0, 0, 2, 0, [2, 3], [0.5, 0.5]),
        (0, 0, 3, 0, [0, 1], [0.5, 0.5]), (1, 0, 0, 0, [4, 5], [0.5, 0.5]), (1, 0, 1, 0, [0, 5], [0.5, 0.5]),
        (1, 0, 2, 0, [6, 7], [0.5, 0.5]), (0, 1, 4, 0, [9, 9], [0.5, 0.5]),  # a decode step: not counted
    ]
    trace = pd.DataFrame(rows, columns=["prompt", "step", "position", "layer", "experts", "weights"])
    out = modality_experts(trace, ids, {7: "audio", 8: "image"})
    assert out["tokens"] == {"text": 3, "audio": 2, "image": 2}
    assert out["experts"] == {"text": {"0": [0, 1, 6, 7]}, "audio": {"0": [1, 2, 3]}, "image": {"0": [0, 4, 5]}}
    assert out["overlap"]["audio~text"]["per_layer"] == {"0": 1 / 6}
    assert out["overlap"]["audio~image"]["mean"] == 0.0
    assert out["overlap"]["image~text"]["per_layer"] == {"0": 1 / 6}
