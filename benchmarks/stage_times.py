"""How long each workflow stage takes on this machine, at the real Qwen3-Omni thinker's dimensions, for a
checkpoint of a few layers; each per-layer stage extrapolated to the real model's 48 layers.

No Snakemake: every stage is the step function its rule's script calls (moe_offload.steps, through
steps.run_step, as workflow/scripts/*.py do), given a stand-in for Snakemake's `snakemake` object with the
inputs, outputs, params, wildcards, log and threads that workflow/rules/*.smk give it, and the paths laid
out as the workflow's (results/..., logs/... under --workdir). Each stage runs in a fresh interpreter, as a
Snakemake script job does; two times are recorded per stage:

  step_s:    the step function alone (its lazy imports of torch/transformers included)
  process_s: the whole job process: interpreter start, imports, the step

Params come from config/config.yaml (with the schema's defaults for keys it leaves out), except the model
(a seeded synthetic checkpoint: --dims real is the thinker's hidden 2048, 128 experts of 768, vocab
152064, 4-GB shards; tiny is config.yaml's toy model) and generate.device/dtype (--device, --dtype).
Depths: the config's depths up to --layers, plus --layers (the full depth), as the workflow plans them.

Prints one JSON object: the environment, each stage's figures, a summary per stage (per-layer medians),
and an extrapolation to 48 layers (labelled as such, next to the per-layer figures it comes from).

  PYTHONPATH=src python benchmarks/stage_times.py --dims tiny --layers 4 --device cpu
  PYTHONPATH=src python3 benchmarks/stage_times.py --dims real --layers 4 --device cuda --dtype bfloat16 \\
      --out benchmarks/results/stage_times_h100.json

Disk: --dims real needs about 2 x (layers x 1.21 GB of experts + 1.25 GB embeddings/lm_head + 38 MB of
attention per layer): 12.5 GB at 4 layers (the checkpoint and its extracted copy); checked before starting.
"""

from __future__ import annotations

import argparse
import copy
import json
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

REAL_LAYERS = 48
REAL_DOWNLOAD_BYTES = 66e9  # the shards the text model needs, from the hub (config model.source: hf)
GB = 1e9
MARKER = ".stage_times_workdir"  # a --workdir this script may clear (its results/, logs/, jobs/)


# ---- the stand-in for Snakemake's `snakemake` object -----------------------------------------------------

class Named(list):
    """Snakemake's named list: the files (flattened) by index, and each named entry as an attribute."""

    def __init__(self, entries=None):
        entries = entries if entries is not None else []
        named = entries if isinstance(entries, dict) else {}
        items = list(entries.values()) if isinstance(entries, dict) else list(entries)
        flat = []
        for item in items:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        super().__init__(flat)
        for key, value in named.items():
            setattr(self, key, Named(value) if isinstance(value, (list, tuple)) else value)

    def keys(self):
        return [k for k in vars(self)]

    def items(self):
        return vars(self).items()

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else super().__getitem__(key)


class Smk:
    def __init__(self, job: dict):
        for key in ("input", "output", "params", "wildcards", "log", "resources"):
            setattr(self, key, Named(job.get(key)))
        self.threads = job.get("threads", 1)
        self.config = job.get("config", {})
        self.rule = job["rule"]


def child(job_path: str) -> None:
    """One job in this fresh interpreter: steps.run_step(smk, step), timed; the result next to the job."""
    t0 = time.perf_counter()
    job = json.loads(Path(job_path).read_text())
    from moe_offload import steps  # as the rule's script does, before torch (steps.START_RSS)

    import_s = time.perf_counter() - t0
    smk = Smk(job)
    start_epoch = time.time()
    t1 = time.perf_counter()
    code = 0
    try:
        steps.run_step(smk, getattr(steps, job["step"]))
    except SystemExit as err:  # run_step's way of failing: one line on stderr, the traceback in the log
        code = err.code if isinstance(err.code, int) else 1
    step_s = time.perf_counter() - t1
    Path(job["result"]).write_text(json.dumps({"ok": code == 0, "exit_code": code, "import_s": import_s,
                                               "step_s": step_s, "start_epoch": start_epoch,
                                               "end_epoch": time.time()}))


# ---- configuration --------------------------------------------------------------------------------------

def with_defaults(value, schema: dict):
    """The config with the schema's defaults filled in where it leaves keys out (what Snakemake's validate
    does), without jsonschema."""
    if "properties" not in schema or not isinstance(value, dict):
        return value
    out = dict(value)
    for key, sub in schema["properties"].items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = with_defaults(out[key], sub)
    return out


def load_config(a, spec: dict) -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config = with_defaults(config, yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()))
    config["model"]["source"] = "synthetic"
    config["model"]["synthetic"] = spec
    config["generate"]["device"] = a.device
    config["generate"]["dtype"] = a.dtype
    if a.max_new_tokens:
        config["generate"]["max_new_tokens"] = a.max_new_tokens
    if a.prompts:
        config["generate"]["prompts"] = config["generate"]["prompts"][:a.prompts]
    return config


# ---- the jobs, as workflow/rules/*.smk declare them -----------------------------------------------------

def plan_jobs(config: dict, text, work: Path, threads: int) -> list[dict]:
    """Every job of a full run, in an order the DAG allows, with the rule's input/output/params/log."""
    from moe_offload.config import canonical

    r = lambda p: str(work / "results" / p)  # noqa: E731
    lg = lambda p: [str(work / "logs" / p)]  # noqa: E731
    gen = config["generate"]
    run = canonical({key: gen[key] for key in ("max_new_tokens", "device", "dtype")})
    manifest = r("model/manifest.json")
    model = config["model"]
    jobs = [dict(rule="download", input={}, output=[manifest], log=lg("download.log"),
                 params=dict(model=canonical({"source": "synthetic", "synthetic": model["synthetic"]}),
                             synthetic_dir=r("model/checkpoint"), metadata_dir=None))]
    for layer in text.expert_layers:
        jobs.append(dict(rule="extract_layer", input=dict(manifest=manifest), wildcards=dict(layer=str(layer)),
                         output=[r(f"experts/layer_{layer}.safetensors")], log=lg(f"extract/layer_{layer}.log")))
    jobs.append(dict(rule="extract_dense", input=dict(manifest=manifest), output=[r("experts/dense.safetensors")],
                     log=lg("extract/dense.log")))
    for layer in text.expert_layers:
        jobs.append(dict(rule="validate_layer", wildcards=dict(layer=str(layer)),
                         input=dict(manifest=manifest, experts=r(f"experts/layer_{layer}.safetensors")),
                         output=[r(f"checksums/layer_{layer}.json")], log=lg(f"validate/layer_{layer}.log")))
    jobs.append(dict(rule="validate_dense", input=dict(manifest=manifest, dense=r("experts/dense.safetensors")),
                     output=[r("checksums/dense.json")], log=lg("validate/dense.log")))
    jobs.append(dict(rule="validate_all", output=[r("checksums/all.json")], log=lg("validate/all.log"),
                     input=dict(manifest=manifest, dense=r("checksums/dense.json"),
                                layers=[r(f"checksums/layer_{layer}.json") for layer in text.expert_layers])))
    native_ref = dict(json=r("generate/native_reference.json"), logits=r("generate/native_logits.safetensors"))
    jobs.append(dict(rule="generate_native_reference", input=dict(manifest=manifest), output=native_ref,
                     log=lg("generate/native_reference.log"), threads=threads,
                     params=dict(prompts=gen["prompts"], run=run, chat_template=gen["chat_template"],
                                 budget={key: config["native"][key] for key in ("max_memory_mb", "cpu_memory_mb")},
                                 offload_dir=os.path.dirname(native_ref["json"]))))
    if config["native"]["timing"]:
        jobs.append(dict(rule="generate_native_timing", input=dict(manifest=manifest),
                         output=dict(json=r("generate/native_timing.json")), log=lg("generate/native_timing.log"),
                         threads=threads,
                         params=dict(prompts=gen["prompts"], run=run, chat_template=gen["chat_template"],
                                     experts_implementation=config["native"]["experts_implementation"])))
    depths = sorted({d for d in gen["depths"] if d <= text.num_layers} | {text.num_layers})
    for depth in depths:
        layers = [layer for layer in text.expert_layers if layer < depth]
        jobs.append(dict(rule="generate_depth", wildcards=dict(depth=str(depth)), threads=threads,
                         input=dict(layers=[r(f"experts/layer_{layer}.safetensors") for layer in layers],
                                    checksums=[r(f"checksums/layer_{layer}.json") for layer in layers],
                                    manifest=manifest, dense=r("experts/dense.safetensors"),
                                    dense_checksum=r("checksums/dense.json"), native=native_ref["json"],
                                    native_logits=native_ref["logits"]),
                         output=dict(json=r(f"generate/depth_{depth}.json"), trace=r(f"traces/depth_{depth}.parquet")),
                         log=lg(f"generate/depth_{depth}.log"),
                         params=dict(run=run, cache=canonical(config["cache"]))))
    native_json = r("generate/native_timing.json" if config["native"]["timing"] else "generate/native_reference.json")
    depth_jsons = [r(f"generate/depth_{d}.json") for d in depths]
    jobs.append(dict(rule="profile_cache", log=lg("profile_cache.log"),
                     input=dict(manifest=manifest, trace=r(f"traces/depth_{text.num_layers}.parquet")),
                     output=dict(csv=r("cache/profile.csv"), json=r("cache/profile.json")),
                     params=dict(profile=canonical(config["profile"]), dtype=gen["dtype"])))
    plots = dict(fidelity=r("plots/fidelity.png"), hit_rate=r("plots/hit_rate.png"),
                 memory_speed=r("plots/memory_speed.png"))
    jobs.append(dict(rule="plots", output=plots, log=lg("plots.log"),
                     input=dict(native=native_json, depths=depth_jsons, profile_csv=r("cache/profile.csv"),
                                profile_json=r("cache/profile.json"))))
    jobs.append(dict(rule="compare", output=dict(json=r("compare.json"), html=r("compare.html")), log=lg("compare.log"),
                     input=dict(manifest=manifest, checksums=r("checksums/all.json"), native=native_json,
                                depths=depth_jsons, profile=r("cache/profile.json"), plots=list(plots.values()),
                                schema=str(ROOT / "workflow" / "schemas" / "compare.schema.yaml")),
                     config=config))
    for job in jobs:
        job.setdefault("threads", 1)
        job["step"] = job["rule"]
    return jobs


def files_of(entries) -> list[str]:
    return [str(f) for f in Named(entries)]


def label(job: dict) -> str:
    wc = job.get("wildcards") or {}
    return job["rule"] + "".join(f"[{k}={v}]" for k, v in wc.items())


def run_job(job: dict, work: Path) -> dict:
    """The job in a fresh interpreter, as Snakemake runs a `script:` rule; its figures."""
    name = label(job)
    missing = [f for f in files_of(job.get("input")) if not Path(f).exists()]
    out = {"stage": name, "rule": job["rule"], "wildcards": job.get("wildcards") or {}, "threads": job["threads"]}
    if missing:
        return {**out, "ok": False, "skipped": f"input missing (an earlier stage failed): {missing[0]}"}
    for f in files_of(job["output"]) + job["log"]:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
    slug = name.replace("[", "_").replace("]", "").replace("=", "")
    jobs_dir = work / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    job_file, result_file = jobs_dir / f"{slug}.json", jobs_dir / f"{slug}.result.json"
    job_file.write_text(json.dumps({**job, "result": str(result_file)}))
    result_file.unlink(missing_ok=True)
    print(f"# {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(jobs_dir / f"{slug}.out", "w") as stream:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)],
                              stdout=stream, stderr=subprocess.STDOUT)
    out["process_s"] = time.perf_counter() - t0
    if not result_file.exists():
        return {**out, "ok": False, "error": f"the job process exited {proc.returncode} without a result",
                "output_tail": _tail(jobs_dir / f"{slug}.out")}
    res = json.loads(result_file.read_text())
    out.update(ok=res["ok"] and proc.returncode == 0, step_s=res["step_s"], import_s=res["import_s"])
    if not out["ok"]:
        out["error"] = _tail(jobs_dir / f"{slug}.out") or _tail(Path(job["log"][0]))
    out.update(figures(job, res))
    print(f"# {name}: {'ok' if out['ok'] else 'FAILED'} step {out['step_s']:.2f} s, process {out['process_s']:.2f} s",
          file=sys.stderr, flush=True)
    return out


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _log_time(log_path: str, marker: str) -> float | None:
    """Epoch seconds of the first log line holding `marker` (run_step's format: '%Y-%m-%d %H:%M:%S,mmm ...')."""
    for line in _tail(Path(log_path), 10**7).splitlines():
        if marker in line:
            try:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                return None
    return None


def _read(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def figures(job: dict, res: dict) -> dict:
    """What a stage's outputs say: bytes and GB/s for the file stages, speeds for the generation ones."""
    rule, step_s, out = job["rule"], res["step_s"], {}
    outputs = Named(job["output"])
    if rule == "download":
        manifest = _read(outputs[0]) or {}
        nbytes = sum(f["size"] for f in manifest.get("files", []))
        out["checkpoint_bytes"] = nbytes
        built = _log_time(job["log"][0], "checkpoint at ")
        if built:  # the step logs when obtain() returns: the build before it, the manifest's hashing after
            out["synthetic_build_s"] = built - res["start_epoch"]
            out["manifest_hash_s"] = res["end_epoch"] - built
            if out["manifest_hash_s"] > 0:
                out["manifest_hash_gb_per_s"] = nbytes / out["manifest_hash_s"] / GB
    elif rule in ("extract_layer", "extract_dense"):
        nbytes = Path(outputs[0]).stat().st_size if Path(outputs[0]).exists() else 0
        out.update(bytes_written=nbytes, gb_per_s=nbytes / step_s / GB if step_s else None)
    elif rule in ("validate_layer", "validate_dense"):
        src = job["input"]["experts" if rule == "validate_layer" else "dense"]
        nbytes = Path(src).stat().st_size
        out.update(file_bytes=nbytes, file_gb_per_s=nbytes / step_s / GB if step_s else None)
    elif rule.startswith("generate_"):
        r = _read(outputs.json) or {}
        mem = r.get("memory", {})
        prompts = r.get("prompts", [])
        out.update(tok_s=r.get("tok_s"), load_s=r.get("load_s"), prefill_s=r.get("prefill_s"),
                   decode_s=sum(p.get("decode_s", 0) for p in prompts),
                   new_tokens=sum(len(p.get("output_ids", [])) for p in prompts), prompts=len(prompts),
                   device=r.get("device"), dtype=r.get("dtype"), torch_threads=r.get("threads"),
                   load_average_at_start=r.get("load_average"),
                   peak_over_baseline_bytes=mem.get("generate_peak_over_baseline_bytes"),
                   memory_ratio_to_bound=mem.get("ratio_to_bound"))
        if r.get("tok_s"):
            out["decode_ms_per_token"] = 1000 / r["tok_s"]
        if isinstance(r.get("speed_bound"), dict):
            out["speed_bound"] = r["speed_bound"]
        if rule == "generate_depth":
            cache, fid = r.get("cache", {}), r.get("fidelity", {})
            out.update(depth=r.get("depth"), cache_capacity=cache.get("capacity"),
                       host_tier_bytes=cache.get("host_tier_bytes"), hit_rate=cache.get("hit_rate"),
                       top1_agreement=fid.get("top1_agreement"), tokens_identical_to_native=fid.get("tokens_identical"),
                       max_abs_logit_diff=fid.get("max_abs_logit_diff"))
        else:
            out.update(experts_implementation=r.get("experts_implementation"))
            if "offload" in r:
                out["offload"] = r["offload"]
    return {k: v for k, v in out.items() if v is not None}


# ---- summary and extrapolation --------------------------------------------------------------------------

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


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 2**20:.2f} MiB"


def summarize(stages: list[dict], planned: dict, planned48: dict, config: dict, real: bool) -> tuple:
    by_rule: dict[str, list[dict]] = {}
    for s in stages:
        by_rule.setdefault(s["rule"], []).append(s)
    summary, extra = {}, {}
    ok = lambda rule: [s for s in by_rule.get(rule, []) if s.get("ok")]  # noqa: E731

    for rule in ("extract_layer", "validate_layer"):
        done = ok(rule)
        if not done:
            continue
        key = "gb_per_s" if rule == "extract_layer" else "file_gb_per_s"
        med = {"step_s": _median(s["step_s"] for s in done), "process_s": _median(s["process_s"] for s in done)}
        summary[rule] = {"layers_measured": len(done), "per_layer_step_s": [s["step_s"] for s in done],
                         "per_layer_process_s": [s["process_s"] for s in done],
                         "median_step_s": med["step_s"], "median_process_s": med["process_s"],
                         "layer_bytes": done[0].get("bytes_written", done[0].get("file_bytes")),
                         f"median_{key}": _median(s.get(key) for s in done)}
        extra[rule] = {"how": f"median per layer x {REAL_LAYERS} (serial)",
                       "measured_median_per_layer_step_s": med["step_s"],
                       "measured_median_per_layer_process_s": med["process_s"],
                       "step_s": med["step_s"] * REAL_LAYERS, "process_s": med["process_s"] * REAL_LAYERS}
    for rule in ("extract_dense", "validate_dense"):
        done = ok(rule)
        if not done:
            continue
        s = done[0]
        summary[rule] = {k: s.get(k) for k in ("step_s", "process_s", "bytes_written", "gb_per_s", "file_bytes",
                                                "file_gb_per_s") if s.get(k) is not None}
        scale = planned48["dense_bytes"] / planned["dense_bytes"]
        extra[rule] = {"how": f"measured x {scale:.2f}, the dense bytes at {REAL_LAYERS} layers over those measured "
                              f"({_size(planned48['dense_bytes'])} / {_size(planned['dense_bytes'])}); the process "
                              "start counted once",
                       "measured_step_s": s["step_s"], "measured_process_s": s["process_s"],
                       "step_s": s["step_s"] * scale, "process_s": s["process_s"] - s["step_s"] + s["step_s"] * scale}
    for s in ok("download"):
        summary["download"] = {k: s.get(k) for k in ("step_s", "process_s", "checkpoint_bytes", "synthetic_build_s",
                                                       "manifest_hash_s", "manifest_hash_gb_per_s") if k in s}
        if s.get("manifest_hash_gb_per_s"):
            # the real checkpoint's bytes; at tiny dims, this checkpoint's scaled to 48 layers
            nbytes = (REAL_DOWNLOAD_BYTES if real else
                      s["checkpoint_bytes"] * planned48["total_bytes"] / planned["total_bytes"])
            hash_s = nbytes / GB / s["manifest_hash_gb_per_s"]
            extra["download"] = {
                "how": f"the manifest's hashing of {'the real' if real else 'a 48-layer'} checkpoint's "
                       f"{_size(nbytes)} at the GB/s measured here (the synthetic build is not part of a real run)",
                "measured_manifest_hash_gb_per_s": s["manifest_hash_gb_per_s"],
                "manifest_hash_s": hash_s, "step_s": hash_s, "process_s": hash_s + s["process_s"] - s["step_s"],
                "not_counted": f"the hub download itself ({REAL_DOWNLOAD_BYTES / GB:.0f} GB): it depends on the "
                               "network and is not measured"}
    for rule in ("validate_all", "generate_native_reference", "generate_native_timing", "profile_cache", "plots",
                 "compare"):
        for s in ok(rule):
            summary[rule] = {k: v for k, v in s.items() if k not in ("stage", "rule", "wildcards", "ok")}
    depth_runs = ok("generate_depth")
    if depth_runs:
        summary["generate_depth"] = {
            str(s["depth"]): {k: s.get(k) for k in ("step_s", "process_s", "load_s", "tok_s", "decode_ms_per_token",
                                                    "prefill_s", "hit_rate", "cache_capacity", "host_tier_bytes",
                                                    "top1_agreement", "tokens_identical_to_native")
                              if s.get(k) is not None}
            for s in depth_runs if "depth" in s}
        points = {k: [(s["depth"], s[k]) for s in depth_runs if s.get(k) is not None and "depth" in s]
                  for k in ("step_s", "process_s", "load_s", "decode_ms_per_token")}
        plan = sorted({d for d in config["generate"]["depths"] if d <= REAL_LAYERS} | {REAL_LAYERS})
        measured = sorted({p[0] for p in points.get("step_s", [])})
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
                "depths": depths,
                "step_s": sum(r.get("step_s", 0) for r in depths.values()),
                "process_s": sum(r.get("process_s", 0) for r in depths.values())}
    total = {k: sum(e.get(k, 0) for e in extra.values()) for k in ("step_s", "process_s")}
    return summary, extra, total


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
    for dist in ("safetensors", "accelerate", "pyarrow", "pandas", "psutil", "xxhash", "matplotlib", "jsonschema",
                 "triton"):
        try:
            env["modules"][dist] = version(dist)
        except PackageNotFoundError:
            env["modules"][dist] = None
    return env


# ---- main ------------------------------------------------------------------------------------------------

def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", choices=["real", "tiny"], default="real")
    p.add_argument("--layers", type=int, default=4, help="layers of the checkpoint built (default 4)")
    p.add_argument("--layout", default="qwen3_omni_thinker", choices=["qwen3_omni_thinker", "qwen3_moe"])
    p.add_argument("--device", default="cpu", help="generate.device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="generate.dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: config generate.max_new_tokens")
    p.add_argument("--prompts", type=int, default=None, help="use the config's first N prompts (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the timed jobs (the workflow gives them every core; default: the usable cores)")
    p.add_argument("--skip", default="", help="comma-separated rules not to run (their dependents are skipped)")
    p.add_argument("--workdir", default=None, help="where results/, logs/ and jobs/ go, cleared first; kept "
                   "afterwards (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the default temp workdir")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    threads = a.threads or len(os.sched_getaffinity(0))

    from common import emit  # benchmarks/ is on sys.path when a script runs
    from generate_speed import DIMS
    from moe_offload.checkpoint.source import planned_text_config
    from moe_offload.resources import extract_bytes

    spec = dict(DIMS[a.dims], layout=a.layout, num_layers=a.layers, seed=0, mlp_only_layers=[])
    config = load_config(a, spec)
    _, text = planned_text_config(config["model"])
    _, text48 = planned_text_config({"source": "synthetic", "synthetic": {**spec, "num_layers": REAL_LAYERS}})
    planned, planned48 = extract_bytes(text), extract_bytes(text48)

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="stage_times."))
    work.mkdir(parents=True, exist_ok=True)
    ours = ("results", "logs", "jobs")
    if not (work / MARKER).exists() and any((work / d).exists() for d in ours):
        sys.exit(f"error: {work} already holds results/ or logs/ that this script did not write: give an empty "
                 "--workdir (never the project's own)")
    (work / MARKER).touch()
    for d in ours:  # every stage runs afresh (a left-over checkpoint would make the build a no-op)
        shutil.rmtree(work / d, ignore_errors=True)
    # the checkpoint, its extracted copy, and a little for the rest
    need = 2 * planned["total_bytes"] + 2**30
    free_start = shutil.disk_usage(work).free
    if free_start < need:
        sys.exit(f"error: {work} has {free_start / GB:.1f} GB free, this run writes about {need / GB:.1f} GB "
                 "(lower --layers, or --workdir on a larger disk)")

    result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "what": "wall seconds of each workflow stage's step function (step_s) and of its whole job process "
                      "(process_s: interpreter start, imports, the step), each stage in a fresh interpreter as "
                      "Snakemake runs a script job; params from config/config.yaml",
              "dims": a.dims, "layers": a.layers, "layout": a.layout, "device": a.device, "dtype": a.dtype,
              "timed_job_threads": threads, "spec": spec,
              "config_used": {k: config[k] for k in ("generate", "native", "cache", "profile")},
              "planned_bytes": {"here": planned, f"at_{REAL_LAYERS}_layers": planned48},
              "disk_free_bytes_at_start": free_start}
    skip = {s for s in a.skip.split(",") if s}
    stages = []
    try:
        for job in plan_jobs(config, text, work, threads):
            if job["rule"] in skip:
                stages.append({"stage": label(job), "rule": job["rule"], "ok": False, "skipped": "--skip"})
                continue
            stages.append(run_job(job, work))
        result["disk_free_bytes_at_end_before_cleanup"] = shutil.disk_usage(work).free
        result["disk_used_bytes"] = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    finally:
        if not a.workdir and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["environment"] = environment(a, work)
    result["stages"] = stages
    summary, extra, total = summarize(stages, planned, planned48, config, a.dims == "real")
    result["summary"] = summary
    result["measured_total"] = {k: sum(s.get(k, 0) for s in stages) for k in ("step_s", "process_s")}
    result[f"extrapolated_to_{REAL_LAYERS}_layers"] = {
        "label": f"EXTRAPOLATED, not measured: the per-layer stages at {REAL_LAYERS} layers from the figures "
                 f"measured at {a.layers} (summary holds those)" +
                 ("" if a.dims == "real" else "; --dims tiny: 48 layers of the tiny model, NOT the real one"),
        "stages": extra,
        "total": total,
        "counted": "download (the manifest's hashing only), extract_layer x 48, extract_dense, "
                   "validate_layer x 48, validate_dense, generate_depth at the config's depths; each run one after "
                   "another (serial)",
        "not_counted": [
            f"the hub download of {REAL_DOWNLOAD_BYTES / GB:.0f} GB (network-bound, not measured here)",
            "Snakemake's own time: planning the DAG, scheduling, job start-up beyond the process, its metadata",
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


if __name__ == "__main__":
    main()
