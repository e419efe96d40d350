"""The native reference within a memory budget smaller than the model: accelerate offloads to disk and
the main job still completes, with parity against the offloaded reference."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moe_offload.runtime.native import offload_memory_map

from conftest import set_config, snakemake, use_small_synthetic


def test_offload_memory_map():
    assert offload_memory_map(torch.device("cpu"), 100) == {"cpu": "100MiB"}  # no GPU named on a CPU run
    assert set(offload_memory_map(torch.device("cpu"), None)) == {"cpu"}
    assert offload_memory_map(torch.device("cuda:1"), 4000, 8000) == {1: "4000MiB", "cpu": "8000MiB"}
    assert offload_memory_map(torch.device("cuda"), None, None) is None


def timed_jobs_ran_alone(log: str, timed=("generate_native_timing", "generate_native_reference", "generate_depth")):
    """From Snakemake's own log: no job was running when a timed job started, and none started before it
    finished."""
    running: dict[str, str] = {}
    for line in log.splitlines():
        start = re.match(r"(?:local)?rule (\w+):", line)
        jobid = re.match(r"\s+jobid: (\d+)", line)
        done = re.match(r"Finished jobid: (\d+) \(Rule: (\w+)\)", line)
        if start:
            rule = start.group(1)
        elif jobid and rule:
            if rule in timed and running:
                return False
            if any(r in timed for r in running.values()):
                return False
            running[jobid.group(1)] = rule
            rule = None
        elif done:
            running.pop(done.group(1), None)
    return True


@pytest.mark.slow
def test_main_job_with_a_budget_below_the_model(workdir):
    use_small_synthetic(workdir)
    # the model is ~4 MB in float32; 1 MiB for the reference, and no timing run (it needs the whole model)
    set_config(workdir, native={"max_memory_mb": 1, "timing": False}, generate={"depths": [2]})
    proc = snakemake(workdir, "--cores", "2", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (workdir / "results/generate/native_timing.json").exists()
    ref = json.loads((workdir / "results/generate/native_reference.json").read_text())
    offload = ref["offload"]
    assert offload["max_memory"] == {"cpu": "1MiB"}
    assert "disk" in offload["placement"] and offload["offloaded_to_disk_bytes"] > offload["held_bytes"]
    assert offload["held_bytes"] <= 2**20
    assert not list((workdir / "results/generate").glob(".offload.*"))  # the offloaded weights are removed
    report = json.loads((workdir / "results/compare.json").read_text())
    assert report["parity"]["tokens_identical"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert report["native"]["tok_s"] == ref["tok_s"]  # without the timing run, the reference's own speed
    logs = sorted((workdir / ".snakemake/log").glob("*.log"))
    assert timed_jobs_ran_alone(logs[-1].read_text())


def test_the_overlap_check_sees_an_overlap():
    log = ("rule extract_layer:\n    jobid: 3\nrule generate_depth:\n    jobid: 4\n"
           "Finished jobid: 3 (Rule: extract_layer)\nFinished jobid: 4 (Rule: generate_depth)\n")
    assert not timed_jobs_ran_alone(log)
    alone = ("rule extract_layer:\n    jobid: 3\nFinished jobid: 3 (Rule: extract_layer)\n"
             "rule generate_depth:\n    jobid: 4\nFinished jobid: 4 (Rule: generate_depth)\n")
    assert timed_jobs_ran_alone(alone)
