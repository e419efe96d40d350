"""Cluster-safe planning with the hub source: config and index are kept under results/model/hub, so the
plan needs no network after the first; only local rules may reach the internet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import error_lines, set_config, snakemake
from test_source import _hub_cache


def test_hub_plan_reads_kept_metadata_offline(workdir, omni_ckpt, tmp_path):
    cache = tmp_path / "hub"
    _hub_cache(omni_ckpt, cache)
    set_config(workdir, model={"source": "hf", "repo_id": "Qwen/Tiny-Omni", "revision": "main",
                               "cache_dir": str(cache)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = snakemake(workdir, "-n", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    kept = workdir / "results/model/hub/Qwen--Tiny-Omni@main"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "model.safetensors.index.json"]
    # the hub (here: its local cache) gone, planning still works from what was kept
    shutil.rmtree(cache)
    again = snakemake(workdir, "-n", "--forceall", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "extract_layer" in again.stdout
    # the jobs that may need the internet run where Snakemake runs, never on a compute node
    code = ("from pathlib import Path; from snakemake.api import SnakemakeApi; "
            "from snakemake.settings.types import ResourceSettings, OutputSettings\n"
            "with SnakemakeApi(OutputSettings()) as api:\n"
            "    w = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path('Snakefile'))._workflow\n"
            "    print(sorted(name for name in w._localrules if not name.startswith('extract_layer_')))")
    local = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert local.stdout.strip() == "['download', 'hub_metadata']", local.stderr[-2000:]


def test_hub_metadata_missing_on_a_compute_node_is_one_line(workdir):
    """A job's own Snakemake process (not the planning one) never fetches: it says what is missing."""
    code = ("from moe_offload.checkpoint.source import planned_text_config; "
            "planned_text_config({'source': 'hf', 'repo_id': 'Qwen/Absent', 'revision': 'main'}, fetch=False)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode != 0
    assert ("InputError: results/model/hub/Qwen--Absent@main/config.json is missing: plan the run where the hub is "
            "reachable first") in proc.stderr
    set_config(workdir, model={"source": "hf", "repo_id": "Qwen/Absent", "revision": "main"})
    offline = snakemake(workdir, "-n", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode != 0
    assert len(error_lines(offline)) == 1 and "could not get config.json of Qwen/Absent@main" in error_lines(offline)[0]
