"""Generation, cache profiling and the comparison report through the Snakemake command line."""

from __future__ import annotations

import base64
import html as html_lib
import json
import re
import subprocess
import sys
from collections import Counter

import jsonschema
import pandas as pd
import pytest

from moe_offload.checkpoint.layouts import detect_checkpoint
import yaml

from moe_offload.checkpoint.shards import header_tensors

from conftest import REPO, SMALL, error_lines, set_config, snakemake, use_small_synthetic

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/compare.schema.yaml").read_text())




def _jobs(plan: str) -> set[str]:
    """Rule names in the job-stats table of a dry run."""
    if "Job stats:" not in plan:
        return set()
    table = plan.split("Job stats:")[1].split("\ntotal")[0].splitlines()[3:]  # past the header and rule
    return {line.split()[0] for line in table if line.strip()}


@pytest.mark.slow
def test_main_job_on_the_default(workdir):
    """`snakemake --cores 4 results/compare.json` (what `make run` does) on the embedded default."""
    proc = snakemake(workdir, "--cores", "4", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "results/compare.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["model"]["num_layers"] == 48 and report["model"]["extraction_valid"]
    checksums = json.loads((workdir / "results/checksums/all.json").read_text())
    assert checksums["valid"] and sorted(map(int, checksums["layers"])) == list(range(48))
    assert [d["depth"] for d in report["depths"]] == [1, 8, 16, 24, 48]
    assert report["parity"]["tokens_identical"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
    full = report["depths"][-1]
    assert full["fidelity"]["top1_agreement"] == 1.0
    # the runtime's LRU counters at the configured capacity are the simulator's at that capacity
    profile = pd.read_csv(workdir / "results/cache/profile.csv")
    cap = full["cache"]["capacity"]
    row = profile[(profile.policy == "lru") & (profile.scope == "per_layer") & (profile.capacity == cap)].iloc[0]
    assert (row.hits, row.misses) == (full["cache"]["hits"], full["cache"]["misses"])
    for (scope, capacity), group in profile.groupby(["scope", "capacity"]):
        rates = dict(zip(group.policy, group.hit_rate))
        assert rates["belady"] >= max(rates["lru"], rates["lfu"]), (scope, capacity)
    for plot in report["plots"]:
        assert (workdir / plot).stat().st_size > 10_000
    assert (workdir / "logs/extract/layer_3.log").read_text()
    from test_native_offload import timed_jobs_ran_alone

    assert timed_jobs_ran_alone(sorted((workdir / ".snakemake/log").glob("*.log"))[-1].read_text())
    again = snakemake(workdir, "--cores", "4", "results/compare.json")
    assert "Nothing to be done" in again.stdout + again.stderr
    html = snakemake(workdir, "--report", "results/report.html")
    assert html.returncode == 0, html.stderr[-2000:]
    text = (workdir / "results/report.html").read_text(errors="replace")
    assert "hit_rate.png" in text and "fidelity.png" in text and "memory_speed.png" in text
    _numbers_are_like_for_like(workdir, report)
    # the comparison is in the report as an HTML table, and `make run` ends with the same table as text
    embedded = re.search(r"filename=compare\.html;base64,([A-Za-z0-9+/=]+)", text)
    table = base64.b64decode(embedded.group(1)).decode()
    assert "<table" in table and "depth 48 (full)" in table and "depth 1 (truncated)" in table
    assert report["cache_profile"]["recommendation"]["text"] in html_lib.unescape(table)
    printed = subprocess.run([sys.executable, "-m", "moe_offload.analysis.summary", "results/compare.json"],
                             cwd=workdir, capture_output=True, text=True)
    assert printed.returncode == 0 and "depth 48 (full)" in printed.stdout and "not comparable" in printed.stdout
    assert "prefill tok/s" in printed.stdout and "n/a" not in printed.stdout


def _numbers_are_like_for_like(workdir, report):
    """Speed ratios only at full depth; the model's memory apart from the framework's; profile bytes at the
    dtype the run holds (float32 here, not the checkpoint's bf16)."""
    for row in report["depths"]:
        assert row["truncated"] == (row["depth"] < 48)
        assert (row["speedup_vs_native"] is None) == row["truncated"]
        # on the CPU too, each speed has a bound from rates probed in its own job, far above it here
        assert 0 < row["tok_s"] < row["tok_s_bound"] and 0 < row["prefill_tok_s"] < row["prefill_tok_s_bound"]
        assert row["prefill_tok_s"] == pytest.approx(row["prompt_tokens"] / row["prefill_s"])
        assert row["kv_bytes_per_token"] > 0 and "probed" in row["bandwidth_source"]
        mem = row["memory"]
        assert mem["framework_overhead_bytes"] > 50 * 2**20  # torch and transformers: tens of MiB at least
        assert 0 < mem["generate_peak_bytes"] < mem["framework_overhead_bytes"]
    depths = [r["bytes_read_per_token"] for r in report["depths"]]
    assert depths == sorted(depths) and len(set(depths)) == len(depths)
    profile = json.loads((workdir / "results/cache/profile.json").read_text())
    _, cfg = detect_checkpoint(workdir / "models/default")  # the default checkpoint's expert size, in float32
    assert profile["dtype"] == "float32" and profile["summary"]["expert_bytes"] == cfg.expert_params * 4
    assert report["cache_profile"]["dtype"] == "float32"


def test_benchmark_files_read_as_one_row_per_job(tmp_path):
    """benchmarks/stage_times.py names each job by its benchmark file; a repeated benchmark is its mean."""
    from moe_offload.analysis.stages import read_benchmarks

    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    paths = []
    for rule, job, lines in (("extract_layer", "layer_3", ["2.0\t0:00:02\t30.5", "4.0\t0:00:04\t31.5"]),
                             ("generate_depth", "depth_8", ["7.5\t0:00:07\tNA"])):
        path = tmp_path / rule / f"{job}.tsv"
        path.parent.mkdir()
        path.write_text(header + "".join(line + "\t-" * 7 + "\n" for line in lines))
        paths.append(str(path))
    rows = read_benchmarks(paths).to_dict("records")
    assert [(r["rule"], r["job"], r["s"]) for r in rows] == [("extract_layer", "layer_3", 3.0),
                                                           ("generate_depth", "depth_8", 7.5)]
    assert rows[0]["max_rss"] == 31.5 and pd.isna(rows[1]["max_rss"])


@pytest.mark.slow
def test_stage_times_come_from_snakemakes_benchmark_files(workdir):
    """Every job that ran left Snakemake's benchmark file under results/benchmarks/<rule>/; the report's
    stage table is their sums per rule, and the files rerun nothing."""
    use_small_synthetic(workdir, num_layers=4)
    set_config(workdir, generate={"depths": [1], "max_new_tokens": 4, "prompts": ["The capital of France is"]})
    proc = snakemake(workdir, "--cores", "2", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = sorted((workdir / ".snakemake/log").glob("*.log"))[-1].read_text()
    ran = Counter(re.findall(r"^(?:local)?rule (\w+):$", log, re.M))
    assert set(ran) >= {"download", "extract_layer", "validate_layer", "generate_depth", "compare"}
    root = workdir / "results/benchmarks"
    files = {rule.name: sorted(rule.glob("*.tsv")) for rule in root.iterdir()}
    assert {rule: len(paths) for rule, paths in files.items()} == dict(ran)
    report = json.loads((workdir / "results/compare.json").read_text())
    jsonschema.validate(report, SCHEMA)
    stages = {s["rule"]: s for s in report["stages"]}
    assert set(stages) == set(ran) - {"compare"}  # the report's own file is written after it
    for rule, stage in stages.items():
        jobs = pd.concat(pd.read_csv(path, sep="\t", na_values="NA") for path in files[rule])
        assert stage["jobs"] == len(jobs) == ran[rule]
        assert stage["seconds"] == pytest.approx(jobs["s"].sum()) and stage["seconds"] > 0
        assert stage["max_rss_mib"] == pytest.approx(jobs["max_rss"].max())
    # a job that imports torch and runs for seconds is sampled, at hundreds of MiB
    assert stages["generate_native_reference"]["max_rss_mib"] > 100
    seconds = [s["seconds"] for s in report["stages"]]
    assert seconds == sorted(seconds, reverse=True)
    printed = subprocess.run([sys.executable, "-m", "moe_offload.analysis.summary", "results/compare.json"],
                             cwd=workdir, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    block = printed.stdout.split("Where the time went:\n")[1].splitlines()
    total = block[len(stages) + 1].split()
    assert total[:3] == ["total", str(sum(ran.values()) - 1), f"{sum(seconds):.1f}"]
    assert "Where the time went" in (workdir / "results/compare.html").read_text()
    assert "Nothing to be done" in snakemake(workdir, "-n", "results/compare.json").stdout


def test_plan_of_the_main_job_is_whole_and_writes_nothing(workdir):
    proc = snakemake(workdir, "-n", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = _jobs(proc.stdout)
    assert {"download", "extract_layer", "extract_dense", "validate_layer", "validate_all", "generate_native_reference",
            "generate_native_timing",
            "generate_depth", "profile_cache", "plots", "compare"} <= jobs
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


@pytest.mark.slow
def test_depth_run_extracts_only_the_layers_it_needs(workdir):
    use_small_synthetic(workdir, num_layers=12)
    proc = snakemake(workdir, "--cores", "2", "results/generate/depth_4.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    extracted = sorted(p.name for p in (workdir / "results/experts").iterdir())
    # the default config's audio and image prompts need the towers, beside the first 4 layers
    assert extracted == ["dense.safetensors"] + [f"layer_{i}.safetensors" for i in range(4)] + ["towers.safetensors"]
    run = json.loads((workdir / "results/generate/depth_4.json").read_text())
    assert run["depth"] == 4 and len(run["prompts"]) == 5
    for p in run["prompts"]:
        assert set(p) >= {"prompt", "input_ids", "output_ids", "text", "fidelity"}
        assert 1 <= len(p["output_ids"]) <= 32
    assert run["memory"]["bound"]["total_bytes"] > 0 and run["cache"]["misses"] > 0
    trace = pd.read_parquet(workdir / "results/traces/depth_4.parquet")
    assert sorted(trace.layer.unique()) == [0, 1, 2, 3]
    assert (trace.experts.map(len) == SMALL["experts_per_token"]).all()
    # new prompts rerun generation, never extraction
    set_config(workdir, generate={"prompts": ["A different prompt"]})
    jobs = _jobs(snakemake(workdir, "-n", "results/generate/depth_4.json").stdout)
    assert {"generate_native_reference", "generate_depth"} <= jobs
    assert not jobs & {"download", "extract_layer", "extract_dense", "validate_layer"}


@pytest.mark.slow
def test_depth_out_of_range_is_one_line(workdir):
    use_small_synthetic(workdir)
    proc = snakemake(workdir, "--cores", "2", "results/generate/depth_99.json")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: depth 99 is out of range: the model has 8 layers"]
    assert not (workdir / "results/generate/depth_99.json").exists()


def test_capacity_below_top_k_is_one_line_before_any_job(workdir):
    """Checked when planning, from the model's config: not in the job, after extraction and native."""
    use_small_synthetic(workdir)
    set_config(workdir, cache={"capacity": 2})
    proc = snakemake(workdir, "--cores", "2", "results/generate/depth_1.json")
    assert proc.returncode != 0
    assert error_lines(proc) == ["error: cache.capacity 2 is below the model's experts_per_token 4: one token "
                                 "needs 4 experts of a layer at once"]
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_layer_file_failing_validation_stops_generation(workdir):
    use_small_synthetic(workdir)
    assert snakemake(workdir, "--cores", "1", "results/experts/layer_1.safetensors").returncode == 0
    path = workdir / "results/experts/layer_1.safetensors"
    info = header_tensors(path)["thinker.model.layers.1.mlp.experts.9.down_proj.weight"]
    data = bytearray(path.read_bytes())
    data[info.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = snakemake(workdir, "--cores", "2", "results/generate/depth_2.json")
    assert proc.returncode != 0
    assert any("layer 1 expert 9 down_proj: extracted bytes differ from source" in l for l in error_lines(proc))
    assert not (workdir / "results/checksums/layer_1.json").exists()
    assert not (workdir / "results/generate/depth_2.json").exists()
