"""Planning as a pure function of (config, the model's text config, a machine description), without
Snakemake: what each job declares, what a local run registers, and the one line that stops a plan."""

from __future__ import annotations

import copy

import pytest
import yaml

from moe_offload import plan as plan_mod, resources as res
from moe_offload.config import SCHEMA
from moe_offload.disk import format_bytes
from moe_offload.plan import Machine, Plan, detect_machine, stated_machine

from test_resources import REAL

GiB = 2**30


def _defaults(schema: dict) -> dict:
    """The config Snakemake's validate() makes of an empty one, from the schema's defaults."""
    out = {}
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            out[key] = {**_defaults(sub), **sub.get("default", {})}
        elif "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    return out


def real_config(**sections) -> dict:
    cfg = _defaults(yaml.safe_load(SCHEMA.read_text()))
    cfg["model"]["source"] = "local"
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


SEQ = len(b"The capital of France is") + 32


def test_a_cluster_run_is_sized_by_the_nodes_the_profile_states():
    cfg = real_config(node_mem_mb=256000, node_gpu_mem_mb=81920)
    machine = stated_machine(cfg)
    assert machine == Machine(256000, 81920, cluster=True)
    p = Plan(cfg, REAL, machine)
    assert p.global_resources() == {}  # nothing caps a job's --mem at the client's machine
    # the CPU native reference holds 0.9 of a node's memory, not of the login node's
    held = res.native_bytes(REAL, "float32", SEQ, int(0.9 * 256000) * 2**20)
    assert p.needs("generate_native_reference", {}) == {"mem_mb": res.to_mb(held["total_bytes"], 1024)}
    # the whole float32 model (114 GiB) fits a 250 GiB node: the plan of a real-size model holds
    whole = res.to_mb(res.native_bytes(REAL, "float32", SEQ)["total_bytes"], 1024)
    assert 113 * 1024 < whole < 116 * 1024
    jobs = [("generate_native_timing", {}), ("generate_native_reference", {}), ("generate_depth", {"depth": "48"}),
            *[("extract_layer", {"layer": str(i)}) for i in range(48)], ("extract_dense", {})]
    assert p.refusal(jobs, free_bytes=100 * 10**9) is None
    # a node smaller than the model: one line naming the job, its need and the node's memory
    small = Plan(real_config(node_mem_mb=64000), REAL, stated_machine(real_config(node_mem_mb=64000)))
    assert small.refusal(jobs, free_bytes=100 * 10**9) == res.fits_line(
        "generate_native_timing", whole, 64000, plan_mod.HINTS["generate_native_timing"], "memory", "a node")


def test_a_local_run_registers_the_machines_bounds():
    cfg = real_config(generate={"device": "cuda", "dtype": "bfloat16"})
    p = Plan(cfg, REAL, Machine(24105, 16384))
    assert p.global_resources() == {"mem_mb": 24105, "gpu": 1, "gpu_mem_mb": 16384}
    assert p.warnings() == []
    depth = p.needs("generate_depth", {"depth": "8"})
    need = res.depth_bytes(REAL, 8, None, "per_layer", "bfloat16", SEQ)
    assert depth == {"mem_mb": res.to_mb(need["dense_bytes"], 1024), "gpu_mem_mb": res.to_mb(need["total_bytes"])}
    line = p.unfit("generate_depth", {"depth": "8"})
    assert line == res.fits_line("generate_depth (depth 8)", depth["gpu_mem_mb"], 16384, "lower cache.capacity",
                                 "GPU memory", "the GPU (cuda)")
    # no GPU figure: nothing to check it against, and one warning saying so
    blind = Plan(cfg, REAL, Machine(24105, None))
    assert "gpu_mem_mb" not in blind.global_resources() and blind.unfit("generate_depth", {"depth": "8"}) is None
    assert blind.warnings() == ["warning: generate.device is cuda, but nvidia-smi reports no such GPU here (or not "
                                "its memory): the GPU jobs' memory is not checked"]
    assert Plan(cfg, REAL, Machine(24105, None, cluster=True)).warnings()[0].startswith(
        "warning: generate.device is cuda, but the profile states no node_gpu_mem_mb")


def test_detect_machine_asks_this_machine_unless_given(monkeypatch):
    asked = []
    monkeypatch.setattr(plan_mod.res, "gpu_memory_mb", lambda device: asked.append(device) or 40960)
    local = detect_machine("cuda:1")
    assert local.mem_mb > 0 and local.gpu_mem_mb == 40960 and asked == ["cuda:1"] and not local.cluster
    assert detect_machine("cuda", {"mem_mb": 1000, "gpu_mem_mb": 2000}) == Machine(1000, 2000)
    assert detect_machine("cuda", ask_gpu=False).gpu_mem_mb is None and detect_machine("cpu").gpu_mem_mb is None
    assert asked == ["cuda:1"]  # given, a job's own process, or the CPU: nvidia-smi is not asked
    assert stated_machine(real_config()) is None  # no node memory stated: a local run


def test_disk_refusal_counts_only_the_extractions_that_run_in_units_that_fit():
    cfg = real_config(resources={"disk_headroom_mb": 0})
    p = Plan(cfg, REAL, Machine(10**6))
    layer = REAL.num_experts * REAL.expert_bytes
    assert p.refusal([("generate_depth", {"depth": "1"})], free_bytes=0) is None  # nothing extracted
    line = p.refusal([("extract_layer", {"layer": "17"})], free_bytes=420_000_000, where="results")
    assert line == (f"error: not enough disk for the extracted experts (1.2 GB) plus resources.disk_headroom_mb "
                    f"under results: needs 1.2 GB, 420.0 MB free")
    assert p.refusal([("extract_layer", {"layer": "17"})], free_bytes=layer) is None


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (999, "999 bytes"), (12_345, "12.3 kB"),
                                     (420_000_000, "420.0 MB"), (1_100_000_000, "1.1 GB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text
