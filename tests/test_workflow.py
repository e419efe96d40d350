"""The Snakemake workflow through its command line: targets, resume after a crash, invalidation, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_offload.checkpoint.validate import validate_layer

from conftest import error_lines, set_config, snakemake, use_small_synthetic




def test_dry_run_plans_without_writing(workdir):
    proc = snakemake(workdir, "-n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extract_layer" in proc.stdout and "validate_all" in proc.stdout
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


@pytest.mark.slow
def test_named_layer_target_extracts_that_layer_only(workdir):
    use_small_synthetic(workdir)
    proc = snakemake(workdir, "--cores", "1", "extract_layer_5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "results/experts").iterdir()) == ["layer_5.safetensors"]
    assert sorted(p.name for p in (workdir / "results/checksums").iterdir()) == ["layer_5.json"]


@pytest.mark.slow
def test_qwen3_moe_local_checkpoint(workdir, qwen3_moe_ckpt):
    set_config(workdir, model={"source": "local", "path": str(qwen3_moe_ckpt)})
    media = snakemake(workdir, "-n")  # the default config's audio and image prompts need a thinker's towers
    assert media.returncode != 0 and error_lines(media) == [
        "error: generate.prompts hold audio or images, but the model's layout (qwen3_moe) has no audio or vision "
        "tower: media prompts need a Qwen3-Omni thinker"]
    set_config(workdir, generate={"prompts": ["The capital of France is", "Once upon a time"]})
    plan = snakemake(workdir, "-n")
    assert "extract_towers" not in plan.stdout  # text only: no towers
    assert "extract_layer_2" not in plan.stdout  # layer 2 is dense: no expert file
    proc = snakemake(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "results/checksums/all.json").read_text())
    assert summary["layout"] == "qwen3_moe"
    assert sorted(map(int, summary["layers"])) == [0, 1, 3, 4, 5, 6, 7]
    assert not (workdir / "results/experts/layer_2.safetensors").exists()
    manifest = json.loads((workdir / "results/model/manifest.json").read_text())
    assert manifest["path"] == str(qwen3_moe_ckpt.resolve())  # used in place, not copied
    bad = snakemake(workdir, "--cores", "1", "results/experts/layer_2.safetensors")
    assert bad.returncode != 0
    assert "error: layer 2 has no experts" in error_lines(bad)[0]


@pytest.mark.slow
def test_kill_9_mid_extraction_then_resume(workdir):
    use_small_synthetic(workdir, num_layers=16)
    checksums = workdir / "results/checksums"
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(checksums.glob("layer_*.json"))) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: Snakemake and its running job
    proc.wait()
    assert not (checksums / "all.json").exists(), "the kill should land mid-extraction"
    ckpt = workdir / json.loads((workdir / "results/model/manifest.json").read_text())["path"]  # project-relative
    # whatever is at a final path is complete: every layer file there validates
    done = {}
    for path in sorted((workdir / "results/experts").glob("layer_*.safetensors")):
        layer = int(path.stem.split("_")[1])
        validate_layer(ckpt, layer, path)
        done[path] = path.stat().st_mtime_ns
    assert done
    assert snakemake(workdir, "--unlock").returncode == 0
    resumed = snakemake(workdir, "--cores", "2", "--rerun-incomplete")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((checksums / "all.json").read_text())["valid"]
    assert {p: p.stat().st_mtime_ns for p in done} == done, "complete layers must not be redone"
    assert not list((workdir / "results").rglob(".*.tmp.*"))


@pytest.mark.slow
def test_config_change_reruns_only_affected_stages(workdir):
    use_small_synthetic(workdir)
    assert snakemake(workdir, "--cores", "2").returncode == 0
    # another source's settings are not this run's input: nothing to do
    set_config(workdir, model={"repo_id": "Qwen/Qwen3-30B-A3B", "revision": "v2"})
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    # a different model (seed) must re-extract every layer
    use_small_synthetic(workdir, seed=1)
    plan = snakemake(workdir, "-n").stdout
    assert "download" in plan and "extract_layer" in plan and "validate_all" in plan


def test_invalid_config_value_is_one_line(workdir):
    set_config(workdir, model={"source": "sideways"})
    proc = snakemake(workdir, "-n")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: invalid config value at model.source: 'sideways' is not one of "
                                  "['embedded', 'synthetic', 'local', 'hf']"]


@pytest.mark.parametrize("sections, line", [
    ({"generate": {"max_new_tokens": 32.0}}, "error: invalid config value at generate.max_new_tokens: 32.0 is not an integer"),
    ({"cache": {"capacity": 8.0}}, "error: invalid config value at cache.capacity: 8.0 is not an integer"),
    ({"generate": {"depths": [8.0]}}, "error: invalid config value at generate.depths.0: 8.0 is not an integer"),
    ({"cache": {"capacity": 1}}, "error: cache.capacity 1 is below the model's experts_per_token 4: one token needs "
                                 "4 experts of a layer at once"),
    ({"model": {"source": "hf", "revision": "../../../tmp/x"}},
     "error: model.revision '../../../tmp/x' is not a branch, tag or commit name (no '..', no part that starts "
     "with '.', no spaces or ~^:?*[\\)"),
])
def test_config_that_would_slip_through_is_one_line_at_plan_time(workdir, sections, line):
    """Each stops the plan before any job (the native reference, extraction) runs or any path is made."""
    set_config(workdir, **sections)
    proc = snakemake(workdir, "-n", "results/compare.json")
    assert proc.returncode != 0
    assert error_lines(proc) == [line], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr
    assert not (workdir / "results").exists()


def test_missing_local_path_is_one_line(workdir):
    set_config(workdir, model={"source": "local", "path": "/no/such/checkpoint"})
    proc = snakemake(workdir, "-n")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: checkpoint directory /no/such/checkpoint does not exist"]
    (workdir / "model.safetensors").write_bytes(b"not a directory")
    set_config(workdir, model={"source": "local", "path": "model.safetensors"})
    proc = snakemake(workdir, "-n")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: checkpoint directory model.safetensors is a file, not a directory"]


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated shard"),
    ("header", "corrupt safetensors header"),
    ("index", "has no model.safetensors.index.json"),
])
def test_damaged_checkpoint_fails_download_and_leaves_no_manifest(workdir, omni_ckpt, tmp_path, damage, message):
    import shutil

    ckpt = tmp_path / "damaged"
    shutil.copytree(omni_ckpt, ckpt)
    shard = sorted(ckpt.glob("model-*.safetensors"))[2]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-64])
    elif damage == "header":
        shard.write_bytes(shard.read_bytes()[:8] + b"\x00garbage" + shard.read_bytes()[16:])
    else:
        (ckpt / "model.safetensors.index.json").unlink()
    set_config(workdir, model={"source": "local", "path": str(ckpt)})
    proc = snakemake(workdir, "--cores", "1")
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and message in lines[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (workdir / "results/model/manifest.json").exists()


@pytest.mark.slow
def test_layer_out_of_range_leaves_nothing(workdir):
    use_small_synthetic(workdir)
    proc = snakemake(workdir, "--cores", "1", "results/experts/layer_99.safetensors")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: layer 99 is out of range: the model has layers 0..7"]
    assert not list((workdir / "results/experts").glob("*layer_99*"))


def test_a_missing_prompt_file_is_one_line_at_plan_time(workdir):
    set_config(workdir, generate={"prompts": ["The capital of France is", {"file": "prompts/absent.txt"}]})
    proc = snakemake(workdir, "-n", "results/compare.json")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: generate.prompts.1: prompt file config/prompts/absent.txt does not exist"]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_a_prompt_file_is_generated_from_and_editing_it_reruns_the_runs(workdir):
    use_small_synthetic(workdir)
    (workdir / "config/prompt.txt").write_text("The capital of France is\n")
    set_config(workdir, generate={"prompts": [{"file": "prompt.txt"}], "max_new_tokens": 2})
    target = "results/generate/native_reference.json"
    proc = snakemake(workdir, "--cores", "2", target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = json.loads((workdir / target).read_text())
    assert [p["prompt"] for p in ref["prompts"]] == ["The capital of France is"]
    (workdir / "config/prompt.txt").touch()  # a newer file, the same text: nothing to redo
    assert "Nothing to be done" in snakemake(workdir, "-n", target).stdout
    (workdir / "config/prompt.txt").write_text("Once upon a time\n")
    plan = snakemake(workdir, "-n", target)
    assert "generate_native_reference" in plan.stdout and "params" in plan.stdout, plan.stdout[-2000:]
