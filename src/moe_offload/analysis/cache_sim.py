"""Replay router traces through the expert-cache policies, offline.

LRU and LFU go through `cache_policy.Scoped`, the very objects the runtime cache uses, and accesses are
generated with `cache_policy.step_accesses`, the runtime's load order; so a simulated hit count equals the
runtime's. Belady's MIN is the offline optimum for demand loading (every accessed expert must become
resident), the bound the online policies are measured against.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from itertools import groupby
from typing import Iterable, Sequence

import pandas as pd

from ..runtime import cache_policy
from ..runtime.cache_policy import ONLINE_POLICIES, Key, Scoped, step_accesses

POLICIES = (*ONLINE_POLICIES, "belady")
SCOPES = ("per_layer", "global")
TRACE_COLUMNS = ("prompt", "step", "position", "layer", "experts")


def access_sequence(trace: pd.DataFrame) -> list[Key]:
    """(layer, expert) keys in runtime order: per (prompt, step, prompt chunk), per layer ascending,
    `step_accesses`."""
    missing = [c for c in TRACE_COLUMNS if c not in trace.columns]
    if missing:
        raise ValueError(f"router trace lacks columns {missing}")
    # Stable: rows of one (prompt, step, layer) keep their position order (it does not change the result,
    # step_accesses sorts, but keeps the replay faithful to what was written).
    # a prompt runs in chunks (cache_policy.PREFILL_CHUNK), each through every layer before the next
    t = trace.assign(chunk=trace["position"] // cache_policy.PREFILL_CHUNK * (trace["step"] == 0))
    t = t.sort_values(["prompt", "step", "chunk", "layer"], kind="stable")
    rows = zip(t["prompt"].tolist(), t["step"].tolist(), t["chunk"].tolist(), t["layer"].tolist(),
               t["experts"].tolist())
    keys: list[Key] = []
    for (_, _, _, layer), group in groupby(rows, key=lambda r: r[:4]):
        chosen = [[int(e) for e in r[4]] for r in group]
        keys.extend((int(layer), e) for e in step_accesses(chosen))
    return keys


def _check(policy: str, scope: str, capacity: int) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r} (known: {', '.join(POLICIES)})")
    if scope not in SCOPES:
        raise ValueError(f"unknown cache scope {scope!r} (per_layer or global)")
    if capacity < 1:
        raise ValueError(f"cache capacity must be at least 1, got {capacity}")


def _scope_groups(accesses: Sequence[Key], scope: str) -> list[list[int]]:
    """Indices of `accesses` that share one pool: one group per layer, or everything."""
    if scope == "global":
        return [list(range(len(accesses)))]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (layer, _) in enumerate(accesses):
        groups[layer].append(i)
    return [groups[layer] for layer in sorted(groups)]


def _belady_flags(keys: Sequence, capacity: int) -> list[bool]:
    """MIN over one pool: on a miss with a full pool, evict the resident used again farthest ahead."""
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    seq = [ids[k] for k in keys]
    n = len(seq)
    never = n  # next use of a key not used again: beyond every real index
    next_use = [never] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = seen.get(seq[i], never)
        seen[seq[i]] = i
    resident: dict[int, int] = {}  # key id -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key id); stale entries skipped lazily
    flags = []
    for i, k in enumerate(seq):
        hit = k in resident
        if not hit and len(resident) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                # next uses only grow, so an entry is current iff it matches the resident's next use
                if resident.get(victim) == -neg:
                    break
            del resident[victim]
        resident[k] = next_use[i]
        heapq.heappush(heap, (-next_use[i], k))
        flags.append(hit)
    return flags


def hit_flags(accesses: Sequence[Key], policy: str, scope: str, capacity: int) -> list[bool]:
    """Per access, whether it hit, for `policy` over `scope` pools of `capacity` experts."""
    _check(policy, scope, capacity)
    if policy != "belady":
        cache = Scoped(policy, scope, capacity)
        return [cache.access(k)[0] for k in accesses]
    flags = [False] * len(accesses)
    for idx in _scope_groups(accesses, scope):
        for i, hit in zip(idx, _belady_flags([accesses[i] for i in idx], capacity)):
            flags[i] = hit
    return flags


def simulate(accesses: Sequence[Key], policy: str, scope: str, capacity: int) -> dict[str, int]:
    """Hit and miss counts of `policy` (lru, lfu, belady) over `scope` pools of `capacity` experts."""
    hits = sum(hit_flags(accesses, policy, scope, capacity))
    return {"hits": hits, "misses": len(accesses) - hits}


def _reuse(keys: Sequence) -> list[float]:
    # Fenwick tree over time, one mark at each key's latest access: the distinct keys touched since a
    # key's previous access are the marks after it. O(n log n).
    n = len(keys)
    tree = [0] * (n + 1)
    marks = 0
    last: dict = {}
    out: list[float] = []
    for t, k in enumerate(keys):
        p = last.get(k)
        if p is None:
            out.append(math.inf)
        else:
            i, upto = p + 1, 0  # marks at positions <= p
            while i > 0:
                upto += tree[i]
                i -= i & -i
            out.append(float(marks - upto))
            i = p + 1
            while i <= n:
                tree[i] -= 1
                i += i & -i
            marks -= 1
        i = t + 1
        while i <= n:
            tree[i] += 1
            i += i & -i
        marks += 1
        last[k] = t
    return out


def reuse_distances(accesses: Sequence[Key], scope: str = "global") -> list[float]:
    """Per access, the number of distinct keys of its pool accessed since its key's previous access
    (inf for a first access). An LRU pool of capacity c hits exactly the accesses with distance < c."""
    if scope not in SCOPES:
        raise ValueError(f"unknown cache scope {scope!r} (per_layer or global)")
    out = [math.inf] * len(accesses)
    for idx in _scope_groups(accesses, scope):
        for i, d in zip(idx, _reuse([accesses[i] for i in idx])):
            out[i] = d
    return out


def expert_popularity(accesses: Iterable[Key]) -> dict[int, Counter]:
    """Per layer, how many accesses each expert got."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for layer, expert in accesses:
        counts[layer][expert] += 1
    return dict(sorted(counts.items()))
