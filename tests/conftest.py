"""Shared fixtures: seeded synthetic checkpoints and a scratch copy of the workflow to run Snakemake in."""

from __future__ import annotations

import os

# The fused decode kernels are Triton; without a GPU they run under Triton's interpreter, which must be
# chosen before triton is first imported. The runtime uses them on the CPU only when asked to.
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_offload.checkpoint.extracted import extract_all
from moe_offload.checkpoint.synthetic import build_synthetic

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "profiles"]

# Small enough to build and extract in about a second; shards of 64 KB make several layers'
# experts straddle shard boundaries, like layers 1 and 5 of the real checkpoint.
SMALL = dict(num_layers=8, num_experts=16, experts_per_token=4, hidden_size=64, moe_intermediate_size=32,
             num_heads=4, num_kv_heads=2, head_dim=16, seed=0, max_shard_size="64KB", mlp_only_layers=[])


def small_spec(layout: str = "qwen3_omni_thinker", **overrides) -> dict:
    return {**SMALL, "layout": layout, **overrides}


@pytest.fixture(scope="session")
def omni_ckpt(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("omni") / "ckpt", small_spec())


@pytest.fixture(scope="session")
def qwen3_moe_ckpt(tmp_path_factory) -> Path:
    # layer 2 has no experts: its MLP is dense and belongs to the dense file
    return build_synthetic(tmp_path_factory.mktemp("qwen3moe") / "ckpt", small_spec("qwen3_moe", mlp_only_layers=[2]))


# Every layer and the dense file of each checkpoint above, extracted once for the session: tests that
# only read them share these (a test that damages a file copies it first).
@pytest.fixture(scope="session")
def omni_extracted(omni_ckpt, tmp_path_factory):
    return extract_all(omni_ckpt, tmp_path_factory.mktemp("omni_extracted"))


@pytest.fixture(scope="session")
def qwen3_moe_extracted(qwen3_moe_ckpt, tmp_path_factory):
    return extract_all(qwen3_moe_ckpt, tmp_path_factory.mktemp("qwen3moe_extracted"))


def copy_workflow(wd: Path) -> Path:
    """The workflow's files copied into wd; the embedded default (tens of MB) and its held-out text
    (training/, which the default config names), read only, linked."""
    wd.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / name)
    for shared in ("models", "training"):
        if (REPO / shared).is_dir():
            (wd / shared).symlink_to(REPO / shared)
    return wd


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A copy of the workflow, so each test has its own results/, logs/ and .snakemake/."""
    return copy_workflow(tmp_path / "wf")


def set_config(workdir: Path, **sections) -> None:
    """Overwrite top-level sections of the scratch workflow's config/config.yaml."""
    path = workdir / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))


def use_small_synthetic(workdir: Path, **overrides) -> None:
    """Point the scratch workflow at a small synthetic Qwen3-Omni checkpoint (SMALL, with overrides)."""
    set_config(workdir, model={"source": "synthetic", "synthetic": {**SMALL, "layout": "qwen3_omni_thinker", **overrides}})


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The one-line errors our steps print (Snakemake's own report around them is not counted)."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]


def snakemake(workdir: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)
