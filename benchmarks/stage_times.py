"""How long each workflow stage takes on this machine, at the real Qwen3-Omni thinker's dimensions, for a
checkpoint of a few layers; each per-layer stage extrapolated to the real model's 48 layers.

The workflow itself is run: a scratch copy of it (Snakefile, workflow/, config/, profiles/) under
--workdir, its config/config.yaml pointed at a seeded synthetic checkpoint (--dims real: the thinker's
hidden 2048, 128 experts of 768, vocab 152064, 4-GB shards; tiny: config.yaml's toy model) of --layers
layers and at --device/--dtype, the rest of the config as config/config.yaml has it; then `snakemake`
there, to results/compare.json. Each job's figures are Snakemake's own: its benchmark file
(results/benchmarks/<rule>/<job>.tsv, every rule's `benchmark:`), whose `s` is the job's wall seconds,
its process included, and `max_rss` its peak memory. The outputs give the bytes moved and the speeds.

Jobs run one at a time (a resource every job takes one of, of which there is one), so that each job's
seconds are its own and the 48-layer sums are serial; --parallel schedules them as `make run` does (the
extract and validate jobs side by side), for the whole run's wall time.

Prints one JSON object: the environment, Snakemake's command and wall time, each job's figures, a summary
per stage (per-layer medians), and an extrapolation to 48 layers (labelled as such, next to the per-layer
figures it comes from).

  PYTHONPATH=src python benchmarks/stage_times.py --dims tiny --layers 4 --device cpu
  PYTHONPATH=src python3 benchmarks/stage_times.py --dims real --layers 4 --device cuda --dtype bfloat16 \\
      --out benchmarks/results/stage_times_h100.json

Disk: --dims real needs about 2 x (layers x 1.21 GB of experts + 1.25 GB embeddings/lm_head + 38 MB of
attention per layer): 12.5 GB at 4 layers (the checkpoint and its extracted copy); checked before starting.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moe_offload.checkpoint.dims import DIMS, REAL_LAYERS, spec as dims_spec  # noqa: E402
from common import emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

REAL_DOWNLOAD_BYTES = 66e9  # the shards the text model needs, from the hub (config model.source: hf)
GB = 1e9
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "profiles"]
MARKER = ".stage_times_workdir"  # a --workdir this script may clear


# ---- the run -----------------------------------------------------------------------------------------------

def write_workflow(work: Path, a, spec: dict) -> dict:
    """The workflow copied into work/, its config the project's with the model, device and dtype of this
    run. Returns that config."""
    import yaml

    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    # read in place, not copied: the embedded default (unused by a synthetic model but planned around) and
    # training/data, whose held-out text the config's fidelity.heldout names relative to config/
    for name in ("models", "training"):
        if (ROOT / name).is_dir():
            (work / name).symlink_to(ROOT / name)
    path = work / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"].update(source="synthetic", synthetic=spec)
    config["generate"].update(device=a.device, dtype=a.dtype)
    if a.max_new_tokens:
        config["generate"]["max_new_tokens"] = a.max_new_tokens
    if a.prompts:
        config["generate"]["prompts"] = config["generate"]["prompts"][:a.prompts]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def run_snakemake(work: Path, a, cores: int) -> dict:
    """`snakemake --cores N` in work/, with this checkout's package first on the path; its wall seconds."""
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores)]
    if not a.parallel:  # every job holds the one `serial`: one job at a time
        command += ["--resources", "serial=1", "--default-resources", "serial=1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    print(f"# {' '.join(command)} (in {work})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(work / "snakemake.out", "w") as stream:
        proc = subprocess.run(command, cwd=work, env=env, stdout=stream, stderr=subprocess.STDOUT)
    out = {"command": " ".join(command[1:]), "exit_code": proc.returncode, "wall_s": time.perf_counter() - t0}
    if proc.returncode:
        out["output_tail"] = _tail(work / "snakemake.out")
    return out


# ---- each job's figures ------------------------------------------------------------------------------------

def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _log_time(path: Path, marker: str) -> float | None:
    """Epoch seconds of the first log line holding `marker` (run_step's format: '%Y-%m-%d %H:%M:%S,mmm ...')."""
    for line in _tail(path, 10**7).splitlines():
        if marker in line:
            try:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                return None
    return None


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.exists() else None


def figures(rule: str, job: str, s: float, work: Path) -> dict:
    """What a job's outputs say: bytes and GB/s (over the job's seconds, its process start included) for
    the file stages, speeds for the generation ones."""
    r = work / "results"
    out: dict = {}
    if rule == "download":
        manifest = r / "model" / "manifest.json"
        out["checkpoint_bytes"] = sum(f["size"] for f in _read_json(manifest).get("files", []))
        built = _log_time(work / "logs" / "download.log", "checkpoint at ")
        if built and manifest.exists():  # logged when the build returns; the manifest is written last
            out["manifest_hash_s"] = manifest.stat().st_mtime - built
            if out["manifest_hash_s"] > 0:
                out["manifest_hash_gb_per_s"] = out["checkpoint_bytes"] / out["manifest_hash_s"] / GB
    elif rule in ("extract_layer", "validate_layer", "extract_dense", "validate_dense"):
        nbytes = _size(r / "experts" / f"{job}.safetensors")  # job: layer_N or dense, as the files are named
        if nbytes:
            out.update(bytes=nbytes, gb_per_s=nbytes / s / GB)
    elif rule.startswith("generate_"):
        # generate_depth_quantized's job q8_depth_4 writes generate/q8/depth_4.json
        res = _read_json(r / "generate" / f"{job.replace('_depth_', '/depth_', 1)}.json")
        mem, prompts = res.get("memory", {}), res.get("prompts", [])
        out.update(tok_s=res.get("tok_s"), load_s=res.get("load_s"), prefill_s=res.get("prefill_s"),
                   decode_s=sum(p.get("decode_s", 0) for p in prompts),
                   new_tokens=sum(len(p.get("output_ids", [])) for p in prompts), prompts=len(prompts),
                   device=res.get("device"), dtype=res.get("dtype"), torch_threads=res.get("threads"),
                   load_average_at_start=res.get("load_average"),
                   peak_over_baseline_bytes=mem.get("generate_peak_over_baseline_bytes"),
                   memory_ratio_to_bound=mem.get("ratio_to_bound"), speed_bound=res.get("speed_bound"))
        if res.get("tok_s"):
            out["decode_ms_per_token"] = 1000 / res["tok_s"]
        if rule.startswith("generate_depth"):
            cache, fid = res.get("cache", {}), res.get("fidelity", {})
            out.update(depth=res.get("depth"), cache_capacity=cache.get("capacity"),
                       host_tier_bytes=cache.get("host_tier_bytes"), hit_rate=cache.get("hit_rate"),
                       top1_agreement=fid.get("top1_agreement"), tokens_identical_to_native=fid.get("tokens_identical"))
        else:
            out.update(experts_implementation=res.get("experts_implementation"), offload=res.get("offload"))
    return {k: v for k, v in out.items() if v is not None}


def jobs(work: Path) -> list[dict]:
    """Every job Snakemake benchmarked, in the order they ended, with its figures."""
    import pandas as pd

    from moe_offload.analysis.stages import read_benchmarks

    paths = sorted((work / "results" / "benchmarks").glob("*/*.tsv"), key=lambda p: p.stat().st_mtime)
    rows = []
    for row in read_benchmarks([str(p) for p in paths]).itertuples():
        rows.append({"rule": row.rule, "job": row.job, "s": float(row.s),
                     "max_rss_mib": None if pd.isna(row.max_rss) else float(row.max_rss),  # NA: never sampled
                     **figures(row.rule, row.job, float(row.s), work)})
    return rows


# ---- summary and extrapolation ---------------------------------------------------------------------------

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _line(points: list[tuple[float, float]]):
    """Least-squares a + b x through two or more points, the slope at least 0 (a stage does not get faster
    with more layers: a negative slope is noise over a fixed cost, so the mean is used)."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    b = max(0.0, sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points))
    return lambda d: my + b * (d - mx)


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 2**20:.2f} MiB"


def summarize(done: list[dict], planned: dict, planned48: dict, depths_config: list[int], real: bool) -> tuple:
    """Per stage: the figures measured here; and each stage extrapolated to 48 layers (serial sums)."""
    by_rule: dict[str, list[dict]] = {}
    for job in done:
        by_rule.setdefault(job["rule"], []).append(job)
    summary, extra = {}, {}
    for rule in ("extract_layer", "validate_layer"):
        runs = by_rule.get(rule, [])
        if runs:
            med = _median(j["s"] for j in runs)
            summary[rule] = {"layers_measured": len(runs), "per_layer_s": [j["s"] for j in runs], "median_s": med,
                             "layer_bytes": runs[0].get("bytes"), "median_gb_per_s": _median(j.get("gb_per_s") for j in runs),
                             "max_rss_mib": max((j["max_rss_mib"] for j in runs if j["max_rss_mib"]), default=None)}
            extra[rule] = {"how": f"median per layer x {REAL_LAYERS} (serial)", "measured_median_per_layer_s": med,
                           "s": med * REAL_LAYERS}
    scale = planned48["dense_bytes"] / planned["dense_bytes"]
    for rule in ("extract_dense", "validate_dense"):
        for j in by_rule.get(rule, []):
            summary[rule] = {k: v for k, v in j.items() if k not in ("rule", "job")}
            extra[rule] = {"how": f"measured x {scale:.2f}, the dense bytes at {REAL_LAYERS} layers over those "
                                  f"measured ({_gb(planned48['dense_bytes'])} / {_gb(planned['dense_bytes'])}); the "
                                  "process start included in what is scaled", "measured_s": j["s"], "s": j["s"] * scale}
    for j in by_rule.get("download", []):
        summary["download"] = {k: v for k, v in j.items() if k not in ("rule", "job")}
        if j.get("manifest_hash_gb_per_s"):
            # the real checkpoint's bytes; at tiny dims, this checkpoint's scaled to 48 layers
            nbytes = REAL_DOWNLOAD_BYTES if real else j["checkpoint_bytes"] * planned48["total_bytes"] / planned["total_bytes"]
            hash_s = nbytes / GB / j["manifest_hash_gb_per_s"]
            extra["download"] = {
                "how": f"the manifest's hashing of {'the real' if real else 'a 48-layer'} checkpoint's {_gb(nbytes)} "
                       "at the GB/s measured here (the synthetic build is not part of a real run)",
                "measured_manifest_hash_gb_per_s": j["manifest_hash_gb_per_s"], "s": hash_s,
                "not_counted": f"the hub download itself ({REAL_DOWNLOAD_BYTES / GB:.0f} GB): it depends on the "
                               "network and is not measured"}
    for rule in ("validate_all", "generate_native_reference", "generate_native_timing", "profile_cache", "plots",
                 "compare"):
        for j in by_rule.get(rule, []):
            summary[rule] = {k: v for k, v in j.items() if k not in ("rule", "job")}
    depth_runs = [j for j in by_rule.get("generate_depth", []) if "depth" in j]
    if depth_runs:
        summary["generate_depth"] = {str(j["depth"]): {k: v for k, v in j.items() if k not in ("rule", "job", "depth")}
                                     for j in depth_runs}
        points = {k: [(j["depth"], j[k]) for j in depth_runs if j.get(k) is not None]
                  for k in ("s", "load_s", "decode_ms_per_token")}
        plan = sorted({d for d in depths_config if d <= REAL_LAYERS} | {REAL_LAYERS})
        measured = sorted({j["depth"] for j in depth_runs})
        if len(measured) < 2:  # one depth cannot part the fixed costs (lm_head, verification) from the per-layer
            extra["generate_depth"] = {"how": f"not extrapolated: one depth measured ({measured}); --layers 2 or "
                                              "more runs two depths, through which a line is drawn"}
        else:
            fits = {k: _line(p) for k, p in points.items() if len({x for x, _ in p}) > 1}
            depths = {}
            for d in plan:
                row = {k: fit(d) for k, fit in fits.items()}
                if row.get("decode_ms_per_token"):
                    row["tok_s"] = 1000 / row["decode_ms_per_token"]
                depths[str(d)] = row
            extra["generate_depth"] = {
                "how": f"a straight line in depth (least squares, slope at least 0) through the depths measured "
                       f"({measured}), at the workflow's depths {plan}; assumes the cache mode measured (capacity "
                       "per layer; the host tier on or off as it was: config cache.host_tier auto turns it off where "
                       "the experts of all layers do not fit in half the RAM, 54 GiB at the real 48 layers)",
                "depths": depths, "s": sum(r.get("s", 0) for r in depths.values())}
    return summary, extra, sum(e.get("s", 0) for e in extra.values())


# ---- environment -----------------------------------------------------------------------------------------

def _fs_type(path: Path) -> str | None:
    best, kind = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def environment(a, work: Path) -> dict:
    import torch
    import transformers

    env = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
           "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
           "workdir": str(work), "workdir_filesystem": _fs_type(work),
           "load_average_1_5_15_at_end": list(os.getloadavg())}
    if a.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(a.device))
        env.update(device_name=props.name, device_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        env["device_name"] = env["cpu"]
    from importlib.metadata import PackageNotFoundError, version

    env["modules"] = {}
    for dist in ("snakemake", "safetensors", "accelerate", "pyarrow", "pandas", "psutil", "xxhash", "matplotlib",
                 "jsonschema", "triton"):
        try:
            env["modules"][dist] = version(dist)
        except PackageNotFoundError:
            env["modules"][dist] = None
    return env


# ---- main ------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", choices=sorted(DIMS), default="real")
    p.add_argument("--layers", type=int, default=4, help="layers of the checkpoint built (default 4)")
    p.add_argument("--layout", default="qwen3_omni_thinker", choices=["qwen3_omni_thinker", "qwen3_moe"])
    p.add_argument("--device", default="cpu", help="generate.device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="generate.dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: config generate.max_new_tokens")
    p.add_argument("--prompts", type=int, default=None, help="use the config's first N prompts (default: all)")
    p.add_argument("--cores", type=int, default=None,
                   help="snakemake --cores, the threads a timed job takes (default: the usable cores)")
    p.add_argument("--parallel", action="store_true", help="schedule jobs side by side, as `make run` does")
    p.add_argument("--workdir", default=None, help="where the workflow is copied and run, cleared first; kept "
                   "afterwards (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the default temp workdir")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    cores = a.cores or len(os.sched_getaffinity(0))

    from moe_offload.checkpoint.source import planned_text_config
    from moe_offload.resources import extract_bytes

    spec = dims_spec(a.dims, a.layers, a.layout)
    _, text = planned_text_config({"source": "synthetic", "synthetic": spec})
    _, text48 = planned_text_config({"source": "synthetic", "synthetic": {**spec, "num_layers": REAL_LAYERS}})
    planned, planned48 = extract_bytes(text), extract_bytes(text48)

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="stage_times."))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()) and not (work / MARKER).exists():
        sys.exit(f"error: {work} is not empty and this script did not make it: give an empty --workdir (never the "
                 "project's own)")
    for entry in work.iterdir():  # every stage runs afresh (a left-over checkpoint would make the build a no-op)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (work / MARKER).touch()
    need = 2 * planned["total_bytes"] + 2**30  # the checkpoint, its extracted copy, and a little for the rest
    free_start = shutil.disk_usage(work).free
    if free_start < need:
        sys.exit(f"error: {work} has {free_start / GB:.1f} GB free, this run writes about {need / GB:.1f} GB "
                 "(lower --layers, or --workdir on a larger disk)")

    config = write_workflow(work, a, spec)
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "what": "each workflow job's wall seconds and peak RSS as Snakemake's benchmark files record them "
                      "(results/benchmarks/<rule>/<job>.tsv: the job's process included), from a run of the "
                      "workflow on a scratch copy; params from config/config.yaml",
              "dims": a.dims, "layers": a.layers, "layout": a.layout, "device": a.device, "dtype": a.dtype,
              "cores": cores, "jobs_one_at_a_time": not a.parallel, "spec": spec,
              "config_used": {k: config[k] for k in ("generate", "native", "cache", "profile")},
              "planned_bytes": {"here": planned, f"at_{REAL_LAYERS}_layers": planned48},
              "disk_free_bytes_at_start": free_start}
    try:
        result["snakemake"] = run_snakemake(work, a, cores)
        result["jobs"] = jobs(work)
        result["disk_used_bytes"] = sum(f.stat().st_size for f in work.rglob("*") if f.is_file() and not f.is_symlink())
        result["environment"] = environment(a, work)
    finally:
        if not a.workdir and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary, extra, total = summarize(result["jobs"], planned, planned48, config["generate"]["depths"],
                                      a.dims == "real")
    result["summary"] = summary
    result["measured_total_s"] = sum(j["s"] for j in result["jobs"])
    result["snakemake_own_s"] = (result["snakemake"]["wall_s"] - result["measured_total_s"]) if not a.parallel else None
    result[f"extrapolated_to_{REAL_LAYERS}_layers"] = {
        "label": f"EXTRAPOLATED, not measured: the per-layer stages at {REAL_LAYERS} layers from the figures "
                 f"measured at {a.layers} (summary holds those)" +
                 ("" if a.dims == "real" else "; --dims tiny: 48 layers of the tiny model, NOT the real one"),
        "stages": extra,
        "total_s": total,
        "counted": "download (the manifest's hashing only), extract_layer x 48, extract_dense, "
                   "validate_layer x 48, validate_dense, generate_depth at the config's depths; each run one after "
                   "another (serial), each job's process included",
        "not_counted": [
            f"the hub download of {REAL_DOWNLOAD_BYTES / GB:.0f} GB (network-bound, not measured here)",
            "Snakemake's own time (planning the DAG, scheduling, its metadata): snakemake_own_s is what it took here",
            "parallelism: Snakemake runs extract/validate jobs side by side (bounded by cores and memory), so their "
            "wall time is below the serial sums above where the disk keeps up",
            "generate_native_reference and generate_native_timing at 48 layers (the real model is 61 GB in bf16: "
            "the reference's offloading and the timing run's load do not scale from a few layers); their measured "
            "figures at this depth are in summary",
            "validate_all, profile_cache, plots, compare (measured here; small)",
            "the page cache: the checkpoint was just written, so extraction and validation read it from RAM; a "
            "real run's 66 GB may not all be cached",
        ],
    }
    if _fs_type(work) in ("tmpfs", "ramfs"):
        result[f"extrapolated_to_{REAL_LAYERS}_layers"]["not_counted"].append(
            "the workdir is on tmpfs (RAM): file stages ran at memory speed, not the disk's")
    emit(result, a.out)
    if result["snakemake"]["exit_code"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
