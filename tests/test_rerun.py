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


STEPS = ["hub_metadata", "download", "extract_layer", "extract_dense", "extract_towers", "validate_layer",
         "validate_dense", "validate_towers", "validate_all", "generate_native_reference", "generate_native_timing", "generate_depth", "profile_cache",
         "plots", "compare"]
VALIDATION = {"validate_layer", "validate_dense", "validate_towers", "validate_all"}


@pytest.mark.parametrize("rel, old, new, changed", [
    # each stage's own module changes that stage's version only
    ("checkpoint/validate.py", None, None, VALIDATION),
    ("checkpoint/extract.py", None, None, {"extract_layer", "extract_dense", "extract_towers"}),
    ("checkpoint/source.py", None, None, {"download"}),
    ("checkpoint/synthetic.py", None, None, {"download"}),
    ("checkpoint/hub.py", None, None, {"hub_metadata", "download"}),
    ("runtime/model.py", None, None, {"generate_depth"}),
    ("runtime/expert_cache.py", None, None, {"generate_depth"}),
    ("analysis/runs.py", None, None, {"generate_depth"}),
    ("runtime/native.py", None, None, NATIVE),
    ("analysis/native_runs.py", None, None, NATIVE),
    ("analysis/cache_sim.py", None, None, {"profile_cache"}),
    ("analysis/plots.py", None, None, {"plots"}),
    ("analysis/compare.py", None, None, {"compare"}),
    # code several stages share changes each of them
    ("hashing.py", None, None, set(STEPS) - {"hub_metadata", "profile_cache", "plots", "compare"}),
    ("analysis/memory_summary.py", None, None, {"plots", "compare"}),
    ("analysis/run_fields.py", None, None, {"plots", "compare"}),
    # in steps.py, by what each step reaches: a helper, a constant, the runner (logging only: none)
    ("steps.py", "    recorded = [json.loads", "    unused = 1\n    recorded = [json.loads", {"generate_depth"}),
    ("steps.py", "    prefix = layout_by_name", "    unused = 1\n    prefix = layout_by_name", NATIVE),
    ("steps.py", "    recorded = [json.loads", "    # a comment\n    recorded = [json.loads", set()),
    ("steps.py", "START_RSS = psutil", "START_RSS = 0 + psutil", NATIVE | {"generate_depth"}),
    ("steps.py", "    stderr = sys.stderr\n", "    stderr = sys.stderr\n    unused = 1\n", set()),
])
def test_a_code_change_changes_the_versions_of_the_steps_running_it(package_copy, rel, old, new, changed):
    before = {step: code_version(step, package_copy) for step in STEPS}
    if old is None:  # a new statement at the end of the module
        (package_copy / rel).write_text((package_copy / rel).read_text() + "\nNEW_STATEMENT = 1\n")
    else:
        _edit(package_copy / rel, old, new)
    cv._tree.cache_clear()
    after = {step: code_version(step, package_copy) for step in STEPS}
    assert {step for step in STEPS if after[step] != before[step]} == changed


def test_stage_modules_stay_apart():
    """What issue 8 asks by name: validation code is not the download's or extraction's; extraction code is
    not the download's; the generation runtime is not extraction's, validation's or native's; native code
    is not the depth runs'."""
    download, depth = set(modules_of("download")), set(modules_of("generate_depth"))
    extract, validate = set(modules_of("extract_layer")), set(modules_of("validate_layer"))
    native = set(modules_of("generate_native_reference")) | set(modules_of("generate_native_timing"))
    assert "moe_offload.checkpoint.validate" not in download | extract
    assert "moe_offload.checkpoint.extract" not in download
    runtime = {"moe_offload.runtime.model", "moe_offload.runtime.generate", "moe_offload.runtime.expert_cache",
               "moe_offload.runtime.kernels", "moe_offload.runtime.graphs", "moe_offload.runtime.fused_step", "moe_offload.runtime.decode", "moe_offload.analysis.runs"}
    assert runtime <= depth and not runtime & (extract | validate | native)
    assert {"moe_offload.runtime.native", "moe_offload.analysis.native_runs"} <= native
    assert not {"moe_offload.runtime.native", "moe_offload.analysis.native_runs"} & depth


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
    # validation code: validation and what follows, not the download, extraction nor native
    validation = plan_after(code("checkpoint/validate.py", "\ndef ", "\nNEW = 1\n\n\ndef "))
    assert VALIDATION - {"validate_towers"} | {"generate_depth"} | AFTER_GENERATION == validation  # text prompts
    # native code: both native jobs and what follows them (the depth runs read the reference)
    assert plan_after(code("runtime/native.py", "\ndef ", "\nNEW = 1\n\n\ndef ")) == (NATIVE | {"generate_depth"}
                                                                                      | AFTER_GENERATION)
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
