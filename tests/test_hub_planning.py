"""Cluster-safe planning with the hub source: config and index are fetched once by the local rule
hub_metadata into results/model/hub, and every plan reads them from there; no plan reaches the hub, and
only local rules may."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import error_lines, set_config, snakemake
from test_source import _hub_cache

MISSING = ("error: model.source hf: the config and index of {repo}@main are not in "
           "results/model/hub/{folder}@main yet; fetch them once where the hub is reachable: snakemake "
           "hub_metadata (then plan again)")


def test_hub_plan_needs_the_metadata_rule_first_then_reads_it_offline(workdir, omni_ckpt, tmp_path):
    cache = tmp_path / "hub"
    _hub_cache(omni_ckpt, cache)
    set_config(workdir, model={"source": "hf", "repo_id": "Qwen/Tiny-Omni", "revision": "main",
                               "cache_dir": str(cache)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kept = workdir / "results/model/hub/Qwen--Tiny-Omni@main"
    # the plan does not fetch, even where the hub (here: its local cache) is at hand: it says what to run
    line = MISSING.format(repo="Qwen/Tiny-Omni", folder="Qwen--Tiny-Omni")
    for target in ([], ["results/compare.json"], ["extract_layer_3"]):
        plan = snakemake(workdir, "-n", *target, env=env)
        assert plan.returncode != 0 and error_lines(plan) == [line], plan.stderr[-2000:]
        assert not kept.exists()
    # the rule that does: a local job, and then the only one there is
    fetch = snakemake(workdir, "--cores", "1", "hub_metadata", env=env)
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "model.safetensors.index.json"]
    assert "localrule hub_metadata:" in fetch.stderr
    # the hub gone, planning works from what was kept
    shutil.rmtree(cache)
    again = snakemake(workdir, "-n", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "extract_layer" in again.stdout and "hub_metadata" not in again.stdout  # kept: nothing to fetch
    # the jobs that may need the internet run where Snakemake runs, never on a compute node
    code = ("from pathlib import Path; from snakemake.api import SnakemakeApi; "
            "from snakemake.settings.types import ResourceSettings, OutputSettings\n"
            "with SnakemakeApi(OutputSettings()) as api:\n"
            "    w = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path('Snakefile'))._workflow\n"
            "    print(sorted(name for name in w._localrules if not name.startswith('extract_layer_')))")
    local = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert local.stdout.strip() == "['download', 'hub_metadata']", local.stderr[-2000:]


def test_hub_metadata_missing_is_one_line_and_the_rule_says_why_it_cannot_fetch(workdir):
    """A process that plans (also a job's own Snakemake process on a compute node) never fetches."""
    code = ("from moe_offload.checkpoint.source import planned_text_config; "
            "planned_text_config({'source': 'hf', 'repo_id': 'Qwen/Absent', 'revision': 'main'})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "InputError: " + MISSING.format(repo="Qwen/Absent", folder="Qwen--Absent")[7:] in proc.stderr
    set_config(workdir, model={"source": "hf", "repo_id": "Qwen/Absent", "revision": "main"})
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fetch = snakemake(workdir, "--cores", "1", "hub_metadata", env=offline)
    assert fetch.returncode != 0
    lines = set(error_lines(fetch))  # the job's line, also shown again from its log
    assert len(lines) == 1 and lines.pop().startswith("error: could not get config.json of Qwen/Absent@main"), lines
    assert not (workdir / "results/model/hub/Qwen--Absent@main/config.json").exists()
