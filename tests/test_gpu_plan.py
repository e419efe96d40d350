"""The GPU's memory bounds a local GPU run at plan time, asked of nvidia-smi (here a fake one, first on
PATH), so that a job that cannot fit on the GPU stops the run before any job starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import error_lines, set_config, snakemake
from moe_offload import resources as res

HINTS = {"generate_depth": "lower cache.capacity",
         "generate_native_reference": "lower native.max_memory_mb (the rest is offloaded to disk)",
         "generate_native_timing": "set native.timing: false (the reference run offloads and still completes)"}


def _env(tmp_path: Path, script: str) -> dict:
    """The environment with a fake nvidia-smi running `script` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{script}\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _gpu_needs(plan: str) -> dict[str, int]:
    """gpu_mem_mb of every job a dry run prints, by the name the one-line error gives the job."""
    needs = {}
    for block in plan.split("\n\n"):
        rule = re.search(r"^rule (\w+):", block, re.M)
        need = re.search(r"\bgpu_mem_mb=(\d+)", block)
        if rule and need:
            depth = re.search(r"wildcards: depth=(\d+)", block)
            name = f"{rule.group(1)} (depth {depth.group(1)})" if depth else rule.group(1)
            needs[name] = int(need.group(1))
    return needs


def test_a_job_that_cannot_fit_on_the_gpu_stops_the_plan(workdir, tmp_path):
    set_config(workdir, generate={"device": "cuda", "dtype": "bfloat16"})
    fits = snakemake(workdir, "-n", env=_env(tmp_path, 'echo "0, 81920"'))
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "warning:" not in fits.stderr and not error_lines(fits)
    needs = _gpu_needs(fits.stdout)
    assert {"generate_native_reference", "generate_native_timing"} <= set(needs)
    assert any(name.startswith("generate_depth (depth ") for name in needs)
    assert all(mb > 0 for mb in needs.values())

    # a GPU smaller than the largest job: one line naming a job that does not fit, its need and the GPU's
    have = max(needs.values()) - 1
    small = snakemake(workdir, "-n", env=_env(tmp_path, f'echo "0, {have}"'))
    assert small.returncode != 0
    expected = {res.fits_line(name, need, have, HINTS[name.split()[0]], "GPU memory", "the GPU (cuda)")
                for name, need in needs.items() if need > have}
    assert len(error_lines(small)) == 1 and error_lines(small)[0] in expected, small.stderr[-2000:]
    assert not (workdir / "results").exists()

    # a bound the user gives wins over the detected one
    given = snakemake(workdir, "-n", "--resources", "gpu_mem_mb=81920", env=_env(tmp_path, f'echo "0, {have}"'))
    assert given.returncode == 0, given.stderr[-2000:]


def test_a_cuda_plan_without_a_gpu_says_so_in_one_line(workdir, tmp_path):
    set_config(workdir, generate={"device": "cuda", "dtype": "bfloat16"})
    proc = snakemake(workdir, "-n", env=_env(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: generate.device is cuda, but nvidia-smi reports no such GPU here (or not its "
                        "memory): the GPU jobs' memory is not checked"]
    # on the CPU nvidia-smi is not asked
    set_config(workdir, generate={"device": "cpu", "dtype": "float32"})
    cpu = snakemake(workdir, "-n", env=_env(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9"))
    assert cpu.returncode == 0 and "warning: generate.device" not in cpu.stderr
