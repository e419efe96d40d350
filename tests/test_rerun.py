"""Reruns follow what changed: code (by each step's code version), settings, prompts, the model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import moe_offload
from moe_offload import code_version as cv
from moe_offload.code_version import code_version, modules_of

from conftest import set_config, snakemake, use_small_synthetic

PACKAGE = Path(moe_offload.__file__).resolve().parent
EXTRACTION = {"download", "extract_layer", "extract_dense", "validate_layer", "validate_dense", "validate_all"}
NATIVE = {"generate_native_reference", "generate_native_timing"}
AFTER_GENERATION = {"profile_cache", "plots", "compare"}


@pytest.fixture
def package_copy(tmp_path) -> Path:
    root = tmp_path / "src" / "moe_offload"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    return text


def test_comments_and_docstrings_change_no_version(package_copy):
    before = {s: code_version(s, package_copy) for s in ("extract_layer", "generate_depth")}
    model = package_copy / "runtime" / "model.py"
    text = model.read_text()
    model.write_text('"""Another docstring."""\n# a new comment\n\n' + text.split('"""', 2)[2].lstrip('\n'))
    cv._tree.cache_clear()
    assert {s: code_version(s, package_copy) for s in before} == before
    _edit(model, "\nclass ", "\nSOMETHING_NEW = 1\n\n\nclass ")
    cv._tree.cache_clear()
    after = {s: code_version(s, package_copy) for s in before}
    assert after["extract_layer"] == before["extract_layer"]
    assert after["generate_depth"] != before["generate_depth"]


def test_each_step_runs_only_its_own_modules():
    assert "moe_offload.runtime.model" not in modules_of("extract_layer")
    assert "moe_offload.runtime.model" in modules_of("generate_depth")
    assert "moe_offload.runtime.model" not in modules_of("generate_native_reference")
    assert "moe_offload.checkpoint.extract" in modules_of("extract_layer")
    assert "moe_offload.resources" not in modules_of("extract_layer")  # resource math changes no output


def _jobs(workdir: Path, env: dict) -> set[str]:
    """Rule names a dry run plans (its job-stats table)."""
    proc = snakemake(workdir, "-n", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "Job stats:" not in proc.stdout:
        return set()
    table = proc.stdout.split("Job stats:")[1].split("\ntotal")[0].splitlines()[3:]
    return {line.split()[0] for line in table if line.strip()} - {"all"}


@pytest.mark.slow
def test_reruns_follow_what_changed(workdir, package_copy):
    use_small_synthetic(workdir, num_layers=4)
    set_config(workdir, generate={"depths": [1], "max_new_tokens": 4, "prompts": ["The capital of France is"]})
    env = {**os.environ, "PYTHONPATH": str(package_copy.parent)}  # jobs and planning use the copy
    first = snakemake(workdir, "--cores", "2", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _jobs(workdir, env) == set()
    config = (workdir / "config" / "config.yaml").read_text()

    def plan_after(change) -> set[str]:
        undo = change()
        try:
            return _jobs(workdir, env)
        finally:
            undo()

    def code(rel, old, new):
        def change():
            text = _edit(package_copy / rel, old, new)
            return lambda: (package_copy / rel).write_text(text)
        return change

    def setting(**sections):
        def change():
            set_config(workdir, **sections)
            return lambda: (workdir / "config" / "config.yaml").write_text(config)
        return change

    # a comment reruns nothing; a statement in the generation runtime reruns generation only
    assert plan_after(code("runtime/model.py", "\nclass ", "\n# a comment\nclass ")) == set()
    assert plan_after(code("runtime/model.py", "\nclass ", "\nNEW = 1\n\n\nclass ")) == {"generate_depth"} | AFTER_GENERATION
    # extraction code: extraction, validation and everything after, not the download nor native
    extraction = plan_after(code("checkpoint/extract.py", "\ndef ", "\nNEW = 1\n\n\ndef "))
    assert {"extract_layer", "extract_dense", "validate_layer", "generate_depth"} <= extraction
    assert not extraction & ({"download"} | NATIVE)
    # the native implementation: the timing run only (and the report that shows it)
    assert plan_after(setting(native={"experts_implementation": "eager"})) == {"generate_native_timing", "plots",
                                                                              "compare"}
    assert plan_after(setting(cache={"capacity": 4})) == {"generate_depth"} | AFTER_GENERATION
    assert plan_after(setting(profile={"hit_rate_target": 0.5})) == AFTER_GENERATION
    assert plan_after(setting(generate={"prompts": ["Once upon a time"]})) == NATIVE | {"generate_depth"} | AFTER_GENERATION
    seed = plan_after(lambda: (use_small_synthetic(workdir, num_layers=4, seed=1),
                               lambda: (workdir / "config" / "config.yaml").write_text(config))[1])
    assert EXTRACTION | NATIVE | {"generate_depth"} | AFTER_GENERATION <= seed
    assert _jobs(workdir, env) == set()  # every change undone: nothing to do
