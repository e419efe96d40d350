"""Issue 18, item 8: the Slurm profile as Snakemake reads it, without a cluster. Extraction's group jobs
split a 48-layer model evenly (no job of one layer), every sbatch call has --no-requeue, and the
download, a local rule, is never submitted."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, set_config, snakemake

PROFILE = ["--workflow-profile", "profiles/slurm"]


def _group_sizes(dry_run: str, group: str, rule: str = r"extract_(?:layer|dense)") -> list[int]:
    """Jobs of `rule` (extraction's, by default) in each group job of `group` that a dry run lists."""
    blocks = dry_run.split("Group job ")[1:]
    return [len(re.findall(rf"^\s*rule {rule}:", block, re.M)) for block in blocks if block.startswith(f"{group} ")]


def test_the_embedded_models_layers_split_evenly_into_group_jobs(workdir):
    """The embedded default has 48 expert layers, like the real thinker and Qwen3-30B-A3B: 49 chains of
    extract + validate (the dense file's pair too)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    size = profile["group-components"]["layers"]
    plan = snakemake(workdir, *PROFILE, "-n", "results/compare.json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    sizes = _group_sizes(plan.stdout + plan.stderr, "layers")
    assert sum(sizes) == 49 and sizes == [size] * (49 // size), sizes  # none left over, so no job of one


def test_quantize_layer_jobs_go_to_group_jobs_of_their_own(workdir):
    """Issue 17: quantize_layer jobs are grouped like extraction's, in a group of their own (with precision
    by popularity they wait for the full-depth run, which waits for every extraction group: in the
    extraction groups they would make a cycle); 48 layers in jobs of 8."""
    set_config(workdir, quantize={"bits": 4, "group_size": 64, "hot": {"bits": 8, "fraction": 0.25}})
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    size = profile["group-components"]["quantize"]
    plan = snakemake(workdir, *PROFILE, "-n", "results/compare.json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    sizes = _group_sizes(plan.stdout + plan.stderr, "quantize", "quantize_layer")
    assert sum(sizes) == 48 and sizes == [size] * (48 // size), sizes
    assert _group_sizes(plan.stdout + plan.stderr, "layers", "quantize_layer") == [0] * 7


@pytest.mark.slow
def test_every_sbatch_call_has_no_requeue_and_download_stays_local(workdir, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "sbatch.calls"
    # sbatch records what it is given and refuses, so that the client stops after its first submission
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "sbatch: error: refused" >&2\nexit 1\n')
    for tool in ("squeue", "sacct", "sinfo", "scontrol"):
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    run = snakemake(workdir, *PROFILE, "--latency-wait", "1", "results/checksums/layer_0.json", env=env)
    assert run.returncode != 0  # the fake sbatch refuses
    assert "localrule download:" in run.stderr and (workdir / "results/model/manifest.json").is_file()
    submitted = Path(calls).read_text().splitlines()
    assert submitted and all("--no-requeue" in call for call in submitted), submitted
    assert not any("rule_download" in call for call in submitted)
