"""Extraction throughput against a plain copy of the same bytes on the same disk, and each job's peak RSS.

Builds (or reuses, --ckpt) a synthetic checkpoint at the real Qwen3-Omni thinker's expert dimensions
(hidden 2048, moe_intermediate 768, 128 experts, bf16; 1.125 GiB of experts per layer), with shards
smaller than a layer so every layer straddles a shard boundary. Then, in two modes:

  warm: the shards are in the page cache (read once beforehand); outputs are not fsynced, exactly as
        the workflow's job leaves them; each timed unit starts after os.sync(), so no unit pays for
        writing back another's output
  cold: before each job every shard is fsynced and dropped from the page cache with
        posix_fadvise(DONTNEED) (no root needed; fincore confirms), and the timing includes an fsync
        of what was written (the disk may still have a cache of its own below the guest)

each layer is extracted by `extract_layer` in a fresh subprocess (its own peak RSS, sampled inside it),
and the baselines copy bytes on the same disk: `shutil.copyfile` of the shards (a kernel copy) and, per
layer, a user-space read+write in 16 MiB chunks of exactly that layer's bytes. A what-if row writes the
extractor's exact output with one os.copy_file_range per tensor (what a kernel-copy extractor would get).
Prints one JSON object.

  PYTHONPATH=src python benchmarks/extract_throughput.py --layers 3 --out benchmarks/results/extract_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from common import emit  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

GiB = 1024 ** 3
# The job, run in a fresh interpreter: the extraction call alone is timed (the imports are not: they are
# import_seconds, and in gb_per_s_including_process_start); a thread samples RSS.
CHILD = r"""
import json, sys, threading, time
from pathlib import Path
t0 = time.perf_counter()
from moe_offload.checkpoint.extract import extract_layer
def status():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
stop = False
def sample():
    while not stop:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s.get(k, 0))
        time.sleep(0.005)
th = threading.Thread(target=sample, daemon=True); th.start()
after_import = status()
t1 = time.perf_counter()
n = extract_layer(sys.argv[1], int(sys.argv[2]), sys.argv[3])
t2 = time.perf_counter()
stop = True; th.join()
end = status()
print(json.dumps({"bytes": n, "extract_seconds": t2 - t1, "import_seconds": t1 - t0,
                  "rss_after_import": after_import["VmRSS"], "vm_hwm": end["VmHWM"],
                  "sampled_peak_rss": peak["VmRSS"], "sampled_peak_rss_anon": peak["RssAnon"],
                  "sampled_peak_rss_file": peak["RssFile"]}))
"""


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(paths) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore), or None where it is missing."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True)
    try:
        return sum(int(line.split()[0]) for line in out.stdout.split("\n") if line.strip())
    except ValueError:
        return None


def warm_up(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def fsync_path(path) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def extract_jobs(ckpt, layers, out_dir, shards, cold):
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for L in layers:
        out = out_dir / f"layer_{L}.safetensors"
        out.unlink(missing_ok=True)
        if cold:
            drop_cache(shards)
        cached = cached_bytes(shards)
        os.sync()  # every timed unit starts with no dirty pages pending (earlier outputs, the build)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(L), str(out)], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"layer {L} job failed: {proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(layer=L, job_wall_seconds=wall, shard_bytes_cached_before=cached)
        row["fsync_seconds"] = fsync_path(out) if cold else 0.0
        row["timed_seconds"] = row["extract_seconds"] + row["fsync_seconds"]
        rows.append(row)
    return rows


def copy_shards(shards, dst_dir, cold):
    dst_dir.mkdir(parents=True, exist_ok=True)
    total, seconds = 0, 0.0
    for s in shards:
        dst = dst_dir / s.name
        dst.unlink(missing_ok=True)
        if cold:
            drop_cache(shards)
        os.sync()  # every timed unit starts with no dirty pages pending (earlier outputs, the build)
        t = time.perf_counter()
        shutil.copyfile(s, dst)
        if cold:
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        seconds += time.perf_counter() - t
        total += s.stat().st_size
        dst.unlink()
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def layer_ranges(ck, layout, cfg, layer):
    """The layer's expert tensors as (shard path, offset, nbytes), in the extractor's output order."""
    infos = [ck.info(n) for n in layout.expert_names(layer, cfg.num_experts)]
    return infos


def read_write_same_bytes(ck, layout, cfg, layers, shards, out_dir, cold, chunk=16 << 20):
    """Per layer, user-space read of that layer's bytes (each shard's span of the layer, sequentially) written
    to one file in `chunk` pieces: the same bytes as the extraction, with no tensor library in between."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total, seconds = 0, 0.0
    for L in layers:
        infos = layer_ranges(ck, layout, cfg, L)
        spans = {}
        for i in infos:
            lo, hi = spans.get(i.file, (i.offset, i.offset + i.nbytes))
            spans[i.file] = (min(lo, i.offset), max(hi, i.offset + i.nbytes))
        dst = out_dir / f"rw_{L}.bin"
        if cold:
            drop_cache(shards)
        os.sync()  # every timed unit starts with no dirty pages pending (earlier outputs, the build)
        t = time.perf_counter()
        with open(dst, "wb") as out:
            for path, (lo, hi) in spans.items():
                with open(path, "rb", buffering=0) as f:
                    f.seek(lo)
                    left = hi - lo
                    while left > 0:
                        n = f.readinto(view[: min(chunk, left)])
                        if not n:
                            raise RuntimeError(f"{path}: short read")
                        out.write(view[:n])
                        left -= n
                        total += n
            if cold:
                out.flush()
                os.fsync(out.fileno())
        seconds += time.perf_counter() - t
        dst.unlink()
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def range_copy_same_tensors(ck, layout, cfg, layers, shards, out_dir, cold):
    """What-if: the extractor's output (header + each tensor's bytes, in its order) written with one
    os.copy_file_range per tensor (a kernel copy: no mmap, no user-space buffer)."""
    from moe_offload.checkpoint.extract import _header_bytes

    total, seconds = 0, 0.0
    for L in layers:
        infos = layer_ranges(ck, layout, cfg, L)
        dst = out_dir / f"rc_{L}.safetensors"
        if cold:
            drop_cache(shards)
        os.sync()  # every timed unit starts with no dirty pages pending (earlier outputs, the build)
        t = time.perf_counter()
        fds = {}
        with open(dst, "wb") as out:
            out.write(_header_bytes(infos, {"format": "pt"}))
            out.flush()
            ofd = out.fileno()
            for i in infos:
                fd = fds.get(i.file) or fds.setdefault(i.file, os.open(i.file, os.O_RDONLY))
                off, left = i.offset, i.nbytes
                while left > 0:
                    n = os.copy_file_range(fd, ofd, left, off)
                    if n <= 0:
                        raise RuntimeError(f"{i.file}: copy_file_range returned {n}")
                    off += n
                    left -= n
                total += i.nbytes
            if cold:
                os.fsync(ofd)
        for fd in fds.values():
            os.close(fd)
        seconds += time.perf_counter() - t
        dst.unlink()
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=None, help="reuse this checkpoint directory (built there if absent)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--layout", default="qwen3_moe", choices=["qwen3_moe", "qwen3_omni_thinker"])
    p.add_argument("--max-shard-size", default="1GB", help="smaller than a layer (1.2 GB) so every layer straddles shards")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--workdir", default=None, help="scratch on the disk to measure (default: a temp dir, removed)")
    p.add_argument("--modes", default="warm,cold")
    p.add_argument("--keep-ckpt", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from moe_offload.checkpoint.dims import spec as dims_spec
    from moe_offload.checkpoint.layouts import detect_checkpoint
    from moe_offload.checkpoint.synthetic import build_synthetic

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="extract_bench."))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.ckpt) if a.ckpt else work / "ckpt"
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "host_cpus": os.cpu_count(),
              "disk_of_workdir": str(work)}
    built_here = False
    try:
        t = time.perf_counter()
        if not (ckpt / "config.json").exists():
            # the experts at the real dims; the vocab small by default (this times the experts, not the dense)
            spec = dims_spec("real", a.layers, a.layout, vocab_size=a.vocab_size, max_shard_size=a.max_shard_size)
            build_synthetic(ckpt, spec)
            built_here = True
            result["build_seconds"] = time.perf_counter() - t
            result["spec"] = spec
        layout, cfg = detect_checkpoint(ckpt)
        from moe_offload.checkpoint.shards import Checkpoint

        ck = Checkpoint(ckpt)
        shards = [ckpt / s for s in ck.shard_names]
        layers = cfg.expert_layers
        layer_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2 * cfg.num_experts
        straddle = {L: sorted({ck.weight_map[n] for n in layout.expert_names(L, cfg.num_experts)}) for L in layers}
        result.update(layout=layout.name, layers=layers, num_experts=cfg.num_experts, layer_expert_bytes=layer_bytes,
                      shards=[{"name": s.name, "bytes": s.stat().st_size} for s in shards],
                      layer_shards=straddle)
        out_dir = work / "out"
        out_dir.mkdir(exist_ok=True)
        modes = {}
        for mode in a.modes.split(","):
            cold = mode == "cold"
            if not cold:
                warm_up(shards)
            jobs = extract_jobs(ckpt, layers, out_dir, shards, cold)
            for f in out_dir.glob("layer_*.safetensors"):
                f.unlink()
            if not cold:
                warm_up(shards)
            copy = copy_shards(shards, work / "copy", cold)
            if not cold:
                warm_up(shards)
            rw = read_write_same_bytes(ck, layout, cfg, layers, shards, out_dir, cold)
            if not cold:
                warm_up(shards)
            rc = range_copy_same_tensors(ck, layout, cfg, layers, shards, out_dir, cold)
            ext_bytes = sum(j["bytes"] for j in jobs)
            ext_s = sum(j["timed_seconds"] for j in jobs)
            ext_wall = sum(j["job_wall_seconds"] + j["fsync_seconds"] for j in jobs)
            ext_gbps = ext_bytes / ext_s / 1e9
            peak = max(j["vm_hwm"] for j in jobs)
            modes[mode] = {
                "page_cache": ("source shards dropped from the page cache before each job (fsync + fadvise DONTNEED), "
                               "fsync of the output included" if cold else
                               "source shards in the page cache, outputs not fsynced (as the workflow's job)"),
                "extract": {"bytes": ext_bytes, "seconds": ext_s, "gb_per_s": ext_gbps,
                            "gb_per_s_including_process_start": ext_bytes / ext_wall / 1e9,
                            "per_layer_gb_per_s": [j["bytes"] / j["timed_seconds"] / 1e9 for j in jobs]},
                "copy_shards_copyfile": copy,
                "read_write_same_bytes": rw,
                "what_if_copy_file_range_per_tensor": rc,
                "ratio_extract_to_copyfile": ext_gbps / copy["gb_per_s"],
                "ratio_extract_to_read_write": ext_gbps / rw["gb_per_s"],
                "max_peak_rss_bytes_one_job": peak,
                "max_peak_rss_gib_one_job": peak / GiB,
                "peak_rss_note": ("each job's own kernel high-water mark (VmHWM) at its end; sampled_peak_rss_file is "
                                  "the part that is the source shards' mmapped page-cache pages, reclaimable. "
                                  "getrusage(RUSAGE_CHILDREN) is not used: a child forked from this large parent "
                                  "is charged the parent's RSS before its exec"),
                "jobs": jobs,
            }
            print(f"# {mode}: extract {ext_gbps:.2f} GB/s, copyfile {copy['gb_per_s']:.2f} GB/s, "
                  f"read+write {rw['gb_per_s']:.2f} GB/s, peak RSS {peak / GiB:.2f} GiB", file=sys.stderr, flush=True)
        result["modes"] = modes
        worst_ratio = min(min(m["ratio_extract_to_copyfile"], m["ratio_extract_to_read_write"]) for m in modes.values())
        worst_rss = max(m["max_peak_rss_bytes_one_job"] for m in modes.values())
        result["summary"] = {
            "worst_ratio_extract_to_copy": worst_ratio, "ratio_target": 0.7, "ratio_ok": worst_ratio >= 0.7,
            "max_peak_rss_gib_one_job": worst_rss / GiB, "rss_target_gib": 2.5, "rss_ok": worst_rss <= 2.5 * GiB,
            **{f"{m}_extract_gb_per_s": v["extract"]["gb_per_s"] for m, v in modes.items()},
            **{f"{m}_copyfile_gb_per_s": v["copy_shards_copyfile"]["gb_per_s"] for m, v in modes.items()},
            **{f"{m}_read_write_gb_per_s": v["read_write_same_bytes"]["gb_per_s"] for m, v in modes.items()},
        }
    finally:
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(work / "copy", ignore_errors=True)
        if built_here and not a.keep_ckpt:
            shutil.rmtree(ckpt, ignore_errors=True)
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_1_5_15_at_end"] = list(os.getloadavg())  # other processes on the machine add noise
    emit(result, a.out)


if __name__ == "__main__":
    main()
