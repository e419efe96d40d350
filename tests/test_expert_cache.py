"""ExpertCache: exact bytes from one read per miss, counters that agree with cache_policy, clear errors."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from moe_offload.runtime.cache_policy import Scoped
from moe_offload.checkpoint.shards import Checkpoint, read_bytes
from moe_offload.errors import InputError
from moe_offload.runtime.expert_cache import CacheOptions, ExpertCache
from moe_offload.checkpoint.layouts import PROJECTIONS
from moe_offload.checkpoint.extracted import build_and_extract

SPEC = dict(layout="qwen3_omni_thinker", num_layers=3, num_experts=8, experts_per_token=2, hidden_size=32,
            moe_intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=16, seed=0, max_shard_size="200KB")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ex = build_and_extract(SPEC, tmp_path_factory.mktemp("cache"))
    return ex.ckpt, ex.layout, ex.config, ex.layers


def make(setup, capacity=4, dtype=torch.float32, experts_per_token=None, **options):
    _, layout, _, files = setup
    return ExpertCache(files, layout, CacheOptions(capacity=capacity, **options), dtype=dtype,
                       experts_per_token=experts_per_token)


def test_get_returns_the_checkpoint_tensors(setup):
    ckpt_dir, layout, cfg, _ = setup
    ckpt = Checkpoint(ckpt_dir)
    for dtype in (torch.float32, torch.bfloat16):
        cache = make(setup, capacity=cfg.num_experts, dtype=dtype)
        for L in cfg.expert_layers:
            for e in (0, 3, cfg.num_experts - 1):
                for proj, got in zip(PROJECTIONS, cache.get(L, e)):
                    info = ckpt.info(layout.expert(L, e, proj))
                    want = torch.frombuffer(bytearray(read_bytes(info)), dtype=torch.bfloat16).view(info.shape)
                    assert got.dtype == dtype and got.shape == want.shape
                    assert torch.equal(got, want.to(dtype))


def test_host_tier_reads_each_file_once_and_serves_misses_from_ram(setup, monkeypatch):
    ckpt_dir, layout, cfg, files = setup
    ckpt = Checkpoint(ckpt_dir)
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(sum(len(b) for b in bufs)) or real(fd, bufs, off))
    cache = make(setup, capacity=cfg.experts_per_token, host_tier=True)
    expert_bytes = cache.expert_bytes(0, 0)
    assert cache.host_tier_bytes == len(files) * cfg.num_experts * expert_bytes
    assert sum(reads) == cache.host_tier_bytes  # every expert's bytes read once, at start
    reads.clear()
    rng = random.Random(0)
    for _ in range(40):  # misses and evictions, all served from RAM
        L, e = rng.choice(cfg.expert_layers), rng.randrange(cfg.num_experts)
        for proj, got in zip(PROJECTIONS, cache.get(L, e)):
            info = ckpt.info(layout.expert(L, e, proj))
            assert torch.equal(got, torch.frombuffer(bytearray(read_bytes(info)), dtype=torch.bfloat16).view(info.shape))
    assert reads == [] and cache.misses > 0 and cache.evictions > 0
    assert cache.bytes_loaded == cache.misses * expert_bytes


def test_one_read_of_exactly_the_expert_bytes_per_miss(setup, monkeypatch):
    _, _, cfg, _ = setup
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(sum(len(b) for b in bufs)) or real(fd, bufs, off))
    cache = make(setup, capacity=2)
    for L, e in [(0, 1), (0, 2), (0, 1), (0, 5), (1, 0), (0, 2)]:
        cache.get(L, e)
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    s = cache.stats()
    assert cache.expert_bytes(0, 1) == expert_bytes
    assert len(reads) == s["misses"] == 5 and all(n == expert_bytes for n in reads)
    assert s["bytes_loaded"] == s["misses"] * expert_bytes
    assert s["hits"] == 1 and s["evictions"] == 2  # (0,5) evicts (0,2), then (0,2) evicts (0,1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_counters_agree_with_cache_policy(setup, policy, scope):
    _, _, cfg, files = setup
    rng = random.Random(1)
    keys = [(rng.choice(sorted(files)), min(int(rng.expovariate(0.4)), cfg.num_experts - 1)) for _ in range(300)]
    capacity = 3
    cache = make(setup, capacity=capacity, scope=scope, policy=policy)
    ref, hits, evictions = Scoped(policy, scope, capacity), 0, 0
    for key in keys:
        first = [t.data_ptr() for t in cache.get(*key)]
        assert [t.data_ptr() for t in cache.get(*key)] == first  # an immediate re-get hits the same slot
        hit, evicted = ref.access(key)
        ref.access(key)
        hits += hit + 1
        evictions += evicted is not None
        pools = len(files) if scope == "per_layer" else 1
        assert key in cache.slot and len(cache.slot) <= capacity * pools
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (hits, 2 * len(keys) - hits, evictions)
    cache.reset_stats()
    assert cache.stats()["misses"] == 0 and cache.stats()["bytes_loaded"] == 0


def test_capacity_below_top_k_is_rejected(setup):
    _, _, cfg, _ = setup
    with pytest.raises(InputError, match="experts_per_token"):
        make(setup, capacity=cfg.experts_per_token - 1)  # top-k read from the files' metadata
    with pytest.raises(InputError, match="experts_per_token 5"):
        make(setup, capacity=4, experts_per_token=5)
    make(setup, capacity=cfg.experts_per_token)


def test_missing_layer_file_is_rejected(setup, tmp_path):
    _, layout, _, files = setup
    with pytest.raises(InputError, match=r"layer 7 .*nope\.safetensors"):
        ExpertCache({**files, 7: tmp_path / "nope.safetensors"}, layout, CacheOptions(capacity=4))
    with pytest.raises(InputError, match="no expert file was given for layer 9"):
        make(setup).get(9, 0)
    with pytest.raises(InputError, match="asked for 8"):
        make(setup).get(0, 8)


def test_experts_must_be_contiguous(setup, tmp_path):
    """A file whose experts are not one byte range each (projection-major order) is refused."""
    _, layout, cfg, files = setup
    tensors = load_file(files[0])
    names = [layout.expert(0, e, p) for p in PROJECTIONS for e in range(cfg.num_experts)]
    header, offset, blobs = {"__metadata__": {"num_experts": str(cfg.num_experts)}}, 0, []
    for name in names:
        blob = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    path = tmp_path / "layer_0.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    with pytest.raises(InputError, match="expert 0's tensors are not one contiguous byte range"):
        ExpertCache({0: path}, layout, CacheOptions(capacity=4))


def test_get_many_equals_one_get_per_expert(setup):
    """Parallel reads of a step's misses decide exactly what the same gets one by one decide."""
    _, layout, cfg, files = setup
    rng = random.Random(3)
    steps = [(rng.choice(sorted(files)), sorted(rng.sample(range(cfg.num_experts), cfg.experts_per_token)))
             for _ in range(200)]
    many, one = make(setup, capacity=3), make(setup, capacity=3)
    for layer, experts in steps:
        many.get_many(layer, experts)
        for e in experts:
            one.get(layer, e)
        assert set(many.slot) == set(one.slot)
        for e in experts:
            for a, b in zip(many.get(layer, e), one.get(layer, e)):
                assert torch.equal(a, b)
    assert many.stats() | {"load_seconds": 0} == one.stats() | {"load_seconds": 0}


@pytest.mark.parametrize("scope, capacity, slots", [("per_layer", 3, 9), ("per_layer", 99, 24), ("global", 5, 5),
                                                    ("global", 99, 24)])
def test_slabs_hold_capacity_times_one_expert(setup, scope, capacity, slots):
    """The memory the cache reserves is its bound: min(capacity, experts there) slots of one expert each."""
    _, _, cfg, files = setup
    cache = make(setup, capacity=capacity, scope=scope)
    assert len(files) * cfg.num_experts == 24
    assert cache.slot_count == slots
    assert cache.slab_bytes == slots * cfg.expert_params * 4  # float32


def test_host_tier_auto_is_on_when_the_experts_fit_in_ram(setup, monkeypatch):
    import psutil

    from moe_offload.analysis.runs import host_tier_on

    _, _, _, files = setup
    need = sum(p.stat().st_size for p in files.values())
    assert host_tier_on(True, files) and not host_tier_on(False, files)
    fake = lambda avail: type("vm", (), {"available": avail})()  # noqa: E731
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake(2 * need))
    assert host_tier_on("auto", files)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake(2 * need - 2))
    assert not host_tier_on("auto", files)


@pytest.mark.parametrize("settings, message", [
    (dict(capacity=0), "cache capacity must be a whole number of experts, at least 1, got 0"),
    (dict(capacity=8.0), "got 8.0"),
    (dict(capacity=True), "got True"),
    (dict(scope="layer"), "unknown cache scope 'layer'"),
    (dict(policy="fifo"), "unknown cache policy 'fifo'"),
    (dict(host_tier="yes"), "host_tier must be true or false"),
    (dict(in_place_misses=1), "in_place_misses must be true, false or null")])
def test_options_are_validated_once(settings, message):
    """Every cache setting is checked where the options are made, with one line naming it."""
    with pytest.raises(InputError, match=message):
        CacheOptions(**settings)


def test_a_cache_collected_while_a_thread_starts_does_not_join_its_readers(setup):
    """A cache nobody closed may be collected anywhere, even inside another thread's start, which holds
    threading's lock for its shutdown list there (CPython 3.11: a collection in `_maintain_shutdown_locks`
    ran this finalizer during a test). Joining the read threads from there waits on that same lock: the
    finalizer must let them go without a join."""
    import threading

    _, _, cfg, files = setup
    cache = make(setup, capacity=cfg.experts_per_token)
    cache.get_many(min(files), list(range(cfg.experts_per_token)))  # file reads: the read threads exist
    finished = threading.Event()

    def collect():
        with threading._shutdown_locks_lock:  # where Thread.start holds it when the collection runs
            cache.__del__()
        finished.set()

    threading.Thread(target=collect, daemon=True).start()
    assert finished.wait(20), "the finalizer joined the read threads while holding the shutdown lock"
