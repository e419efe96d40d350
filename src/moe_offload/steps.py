"""The workflow's steps as plain functions of (input, output, params, wildcards), plus the runner that
workflow/scripts/*.py use: log to the rule's log file, and turn a failed check into one line on stderr
and a non-zero exit."""

from __future__ import annotations

import errno
import json
import logging
import sys
import traceback
from pathlib import Path

import psutil
from tqdm import tqdm

from .atomic import atomic_path, write_json
from .disk import disk_full_line
from .errors import InputError
from .checkpoint.layouts import TextConfig

log = logging.getLogger("moe_offload")


# The process before torch and transformers are imported: the memory meter reports what they add apart
# from what the model holds.
START_RSS = psutil.Process().memory_info().rss


def run_step(smk, step) -> None:
    """Entry point for a Snakemake `script:`: runs step(smk) with logging to smk.log[0]. The log is
    opened for appending, as the progress bars and the job's stderr are written into it too."""
    log_path = Path(smk.log[0]) if smk.log else None
    handler = logging.FileHandler(log_path, mode="a") if log_path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.raiseExceptions = False  # a log line lost to a full disk prints no traceback of its own
    stderr = sys.stderr
    if log_path:  # the job's stderr (library warnings, our error line) goes into its log as well
        sys.stderr = _Tee(stderr, open(log_path, "a"))
    try:
        step(smk)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise_unexpected(err, log_path)
        # outside an atomic output (a library's own file): one line all the same, the traceback in the log
        log.error("disk full:\n%s", traceback.format_exc())
        print(f"error: {disk_full_line(err.filename or '.')}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        raise_unexpected(err, log_path)
    finally:
        if sys.stderr is not stderr:
            sys.stderr.streams[1].close()
            sys.stderr = stderr


def raise_unexpected(err: Exception, log_path) -> None:
    log.error("unexpected failure:\n%s", traceback.format_exc())
    print(f"error: unexpected {type(err).__name__}: {err} (traceback in {log_path})", file=sys.stderr)
    sys.exit(1)


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    # The log's copy is best effort: on a full disk it cannot be written, and the terminal's one line
    # must still come out alone.
    def write(self, text):
        for stream in self.streams:
            try:
                stream.write(text)
                stream.flush()
            except OSError:
                if stream is self.streams[0]:
                    raise
        return len(text)

    def flush(self):
        for stream in self.streams:
            try:
                stream.flush()
            except OSError:
                if stream is self.streams[0]:
                    raise

    def isatty(self):
        return False


def progress_bar(smk, total: int | None, unit: str, desc: str) -> tqdm:
    """A tqdm bar written into the rule's log, so long steps show progress in logs/."""
    stream = open(smk.log[0], "a") if smk.log else sys.stderr
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=stream, mininterval=2.0)


def _manifest(smk) -> dict:
    return json.loads(Path(smk.input.manifest).read_text())


def _checkpoint(smk) -> Path:
    """The checkpoint directory, checked unchanged since its manifest."""
    from .checkpoint.manifest import manifest_checkpoint

    return manifest_checkpoint(_manifest(smk))


def hub_metadata(smk) -> None:
    from .checkpoint.hub import fetch_hub_metadata

    out = fetch_hub_metadata(smk.params.model, Path(smk.output[0]).parent)
    log.info("hub metadata of %s in %s", smk.params.model["repo_id"], out)


def download(smk) -> None:
    from .checkpoint.source import build_manifest, obtain

    model_cfg = smk.params.model
    path = obtain(model_cfg, smk.params.synthetic_dir, smk.params.metadata_dir)
    log.info("checkpoint at %s", path)
    with progress_bar(smk, None, "file", "hashing checkpoint") as bar:  # its total: set by build_manifest
        manifest = build_manifest(path, model_cfg, bar)
    write_json(smk.output[0], manifest)


def extract_layer(smk) -> None:
    from .checkpoint.extract import extract_layer as extract

    manifest, layer = _manifest(smk), int(smk.wildcards.layer)
    total = manifest["num_experts"] * TextConfig.from_dict(manifest["text_config"]).expert_bytes
    checkpoint = _checkpoint(smk)
    with progress_bar(smk, total, "B", f"layer {layer}") as bar:
        nbytes = extract(checkpoint, layer, smk.output[0], bar)
    log.info("layer %d: wrote %d bytes of experts to %s", layer, nbytes, smk.output[0])


def hot_experts(smk) -> None:
    """Precision by popularity: per layer, the experts the full-depth run's router used most (every
    routed token of every prompt, prefill and decode), the hot fraction of them."""
    import pandas as pd

    from .checkpoint.quantize import hot_experts as choose

    num_experts = _manifest(smk)["num_experts"]
    trace = pd.read_parquet(smk.input.trace, columns=["layer", "experts"]).explode("experts")
    counts = {int(layer): {int(e): int(n) for e, n in group["experts"].value_counts().items()}
              for layer, group in trace.groupby("layer")}
    chosen = choose(counts, num_experts, smk.params.fraction)
    uses = {layer: sum(c.values()) for layer, c in counts.items()}
    write_json(smk.output[0], {
        "fraction": smk.params.fraction, "trace": str(smk.input.trace),
        "per_layer": {str(layer): experts for layer, experts in chosen.items()},
        # how much of the router's work the hot experts take: the fraction of routed (token, expert) uses
        "share_of_uses": {str(layer): sum(counts[layer].get(e, 0) for e in experts) / uses[layer]
                          for layer, experts in chosen.items()}})
    log.info("hot experts: %d per layer, %.0f%% of the routed uses on average", len(next(iter(chosen.values()))),
             100 * sum(sum(counts[L].get(e, 0) for e in ex) / uses[L] for L, ex in chosen.items()) / len(chosen))


def quantize_layer(smk) -> None:
    from .hashing import verify_files
    from .checkpoint.quantize import quantize_layer as quantize
    from .config import parse_scheme

    layer, (bits, hot_bits) = int(smk.wildcards.layer), parse_scheme(smk.wildcards.scheme)
    recorded = json.loads(Path(smk.input.checksum).read_text())["file_xxh3_128"]
    verify_files([(Path(smk.input.experts), recorded, str(smk.input.experts))])  # the validated bytes only
    hot = None
    if hot_bits:
        per_layer = json.loads(Path(smk.input.hot).read_text())["per_layer"]
        hot = (hot_bits, per_layer.get(str(layer), []))
    num_experts = _manifest(smk)["num_experts"]
    with progress_bar(smk, num_experts, "expert", f"layer {layer} to {smk.wildcards.scheme} bits") as bar:
        record = quantize(smk.input.experts, smk.output.experts, bits, smk.params.group_size,
                          smk.params.scales == "search", bar, hot=hot)
    write_json(smk.output.record, record)


def extract_dense(smk) -> None:
    from .checkpoint.extract import extract_dense as extract

    nbytes = extract(_checkpoint(smk), smk.output[0])
    log.info("dense: wrote %d bytes to %s", nbytes, smk.output[0])


def extract_towers(smk) -> None:
    from .checkpoint.extract import extract_towers as extract

    nbytes = extract(_checkpoint(smk), smk.output[0])
    log.info("towers: wrote %d bytes to %s", nbytes, smk.output[0])


def _validated(validate, extracted: str, *args) -> dict:
    """validate(*args, extracted); an extracted file found faulty is removed, so that the next run extracts it
    again (Snakemake reruns a job whose output is missing): without it, every rerun would fail on the same
    bad file, its mtime newer than the manifest, until someone deleted it by hand."""
    from .checkpoint.validate import ExtractedFileError

    try:
        return validate(*args, extracted)
    except ExtractedFileError as err:
        Path(extracted).unlink(missing_ok=True)
        raise InputError(f"{err}; removed {extracted}, the next run extracts it again") from None


def validate_layer(smk) -> None:
    from .checkpoint.validate import validate_layer as validate

    layer = int(smk.wildcards.layer)
    report = _validated(validate, smk.input.experts, _checkpoint(smk), layer)
    log.info("layer %d: %d tensors match the source", layer, len(report["tensors"]))
    write_json(smk.output[0], report)


def validate_dense(smk) -> None:
    from .checkpoint.validate import validate_dense as validate

    report = _validated(validate, smk.input.dense, _checkpoint(smk))
    log.info("dense: %d tensors match the source", len(report["tensors"]))
    write_json(smk.output[0], report)


def validate_towers(smk) -> None:
    from .checkpoint.validate import validate_towers as validate

    report = _validated(validate, smk.input.towers, _checkpoint(smk))
    log.info("towers: %d tensors match the source", len(report["tensors"]))
    write_json(smk.output[0], report)


def validate_all(smk) -> None:
    from .checkpoint.validate import validate_all as validate

    dense = json.loads(Path(smk.input.dense).read_text())
    layers = [json.loads(Path(p).read_text()) for p in smk.input.layers]
    report = validate(_checkpoint(smk), dense, layers)
    log.info("all %d tensors of the text model present exactly once", report["tensors"])
    write_json(smk.output[0], report)


def _native_files(checkpoint: Path, manifest: dict) -> list[tuple[Path, str, str]]:
    """The checkpoint files the native model reads (config, tokenizer, shards with its tensors), with
    their hashes from the manifest."""
    from .checkpoint.layouts import layout_by_name
    from .checkpoint.shards import Checkpoint

    prefix = layout_by_name(manifest["layout"]).native
    shards = {shard for name, shard in Checkpoint(checkpoint).weight_map.items() if name.startswith(prefix)}
    return [(checkpoint / f["name"], f["xxh3_128"], "download") for f in manifest["files"]
            if f["name"] in shards or not f["name"].endswith(".safetensors")]


def _depth_files(smk) -> list[tuple[Path, str, str]]:
    """The dense file and each layer file this depth loads, with the hashes validation recorded."""
    recorded = [json.loads(Path(p).read_text()) for p in smk.input.checksums]
    by_layer = {r["layer"]: r["file_xxh3_128"] for r in recorded}
    files = [(Path(smk.input.dense), json.loads(Path(smk.input.dense_checksum).read_text())["file_xxh3_128"],
              str(smk.input.dense))]
    for path in smk.input.layers:
        layer = int(Path(path).stem.split("_")[1])
        files.append((Path(path), by_layer[layer], str(path)))
    if "towers" in smk.input.keys():
        files.append((Path(smk.input.towers), json.loads(Path(smk.input.towers_checksum).read_text())["file_xxh3_128"],
                      str(smk.input.towers)))
    return files


def _native_start(smk) -> Path:
    """What both native jobs do first: take their threads, and hash the checkpoint files the native model
    reads against the manifest. Returns the checkpoint directory."""
    from .analysis.run_info import use_threads
    from .hashing import verify_files

    use_threads(smk.threads)
    manifest, checkpoint = _manifest(smk), _checkpoint(smk)
    files = _native_files(checkpoint, manifest)
    with progress_bar(smk, len(files), "file", "verifying checkpoint files") as bar:
        verify_files(files, bar)
    return checkpoint


def generate_native_reference(smk) -> None:
    from .analysis.native_runs import run_native_reference

    run, budget, prompts = smk.params.run, smk.params.budget, list(smk.params.prompts)
    checkpoint = _native_start(smk)
    with progress_bar(smk, len(prompts), "prompt", "native reference") as bar:
        result = run_native_reference(checkpoint, prompts, run["max_new_tokens"], run["device"], run["dtype"],
                                      budget["max_memory_mb"], budget["cpu_memory_mb"], smk.params.offload_dir,
                                      smk.output.json, smk.output.logits, bar,
                                      chat_template=smk.params.chat_template, start_rss=START_RSS)
    log.info("native reference: %s, %d bytes held, %d offloaded to disk", result["offload"]["placement"],
             result["offload"]["held_bytes"], result["offload"]["offloaded_to_disk_bytes"])


def generate_native_timing(smk) -> None:
    from .analysis.native_runs import run_native_timing

    run, impl, prompts = smk.params.run, smk.params.experts_implementation, list(smk.params.prompts)
    checkpoint = _native_start(smk)
    with progress_bar(smk, len(prompts), "prompt", "native timing") as bar:
        result = run_native_timing(checkpoint, prompts, run["max_new_tokens"], run["device"], run["dtype"],
                                   smk.output.json, None if impl == "default" else impl, bar,
                                   chat_template=smk.params.chat_template, start_rss=START_RSS)
    log.info("native: load %.2f s, decode %.2f tok/s on %s, %d threads", result["load_s"], result["tok_s"],
             result["device"], result["threads"])


def generate_depth(smk) -> None:
    from .analysis.run_info import use_threads
    from .hashing import verify_files
    from .analysis.runs import run_depth

    run, depth = smk.params.run, int(smk.wildcards.depth)
    use_threads(smk.threads)
    layer_files = {int(Path(p).stem.split("_")[1]): Path(p) for p in smk.input.layers}
    native = json.loads(Path(smk.input.native).read_text())
    checkpoint = _checkpoint(smk)
    files = _depth_files(smk)
    with progress_bar(smk, len(files), "file", "verifying extracted files") as bar:
        verify_files(files, bar)
    with progress_bar(smk, len(native["prompts"]), "prompt", f"depth {depth} generation") as bar:
        heldout = (Path(smk.input.heldout[0]), *smk.params.heldout) if smk.input.get("heldout") else None
        result = run_depth(checkpoint, smk.input.dense, layer_files, depth, dict(smk.params.cache),
                           run["device"], run["dtype"], run["max_new_tokens"], native, smk.input.native_logits,
                           smk.output.json, smk.output.trace, bar, start_rss=START_RSS, heldout=heldout,
                           towers_path=smk.input.towers if "towers" in smk.input.keys() else None)
    log.info("depth %d: decode %.2f tok/s, hit rate %s, top-1 agreement %.3f", depth, result["tok_s"],
             result["cache"]["hit_rate"], result["fidelity"]["top1_agreement"])


def profile_cache(smk) -> None:
    import pandas as pd

    from .analysis.profile import default_capacities, profile_cache as profile, recommend

    manifest, params = _manifest(smk), smk.params.profile
    cfg = TextConfig.from_dict(manifest["text_config"])
    k, experts = manifest["experts_per_token"], manifest["num_experts"]
    per_layer = params["capacities"] or default_capacities(k, experts)
    trace = pd.read_parquet(smk.input.trace)
    layers = trace["layer"].nunique()
    # bytes at the dtype the run holds its experts in, not the checkpoint's bf16
    dtype = smk.params.dtype
    expert_bytes = cfg.expert_params * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    table, summary = profile(trace, per_layer, [c * layers for c in per_layer], expert_bytes, experts, k,
                             params["hit_rate_target"])
    if "depth" in smk.input.keys():  # media prompts: which experts each modality's tokens use
        from .analysis.profile import modality_experts

        run = json.loads(Path(smk.input.depth).read_text())
        kinds = {token: kind for kind, token in run["media_token_ids"].items()}
        summary["modalities"] = modality_experts(trace, [p["input_ids"] for p in run["prompts"]], kinds)
    with atomic_path(smk.output.csv) as tmp:
        table.to_csv(tmp, index=False)
    write_json(smk.output.json, {"trace": str(smk.input.trace), "dtype": dtype, "hit_rate_target": params["hit_rate_target"],
                                 "recommendation": recommend(summary, layers), "summary": summary})
    log.info("profiled %d accesses over %d tokens", summary["accesses"], summary["tokens"])


def plots(smk) -> None:
    import pandas as pd

    from .analysis.memory_summary import memory_summary
    from .analysis.plots import plot_fidelity, plot_hit_rate, plot_memory_speed, plot_quality_bytes
    from .analysis.run_fields import expert_bits

    native = json.loads(Path(smk.input.native).read_text())
    runs = [json.loads(Path(p).read_text()) for p in smk.input.depths]
    plot_quality_bytes(runs, smk.output.quality_bytes)
    depths = [run for run in runs if expert_bits(run) == 16]
    plot_fidelity(native, depths, smk.output.fidelity)
    profile = json.loads(Path(smk.input.profile_json).read_text())
    plot_hit_rate(pd.read_csv(smk.input.profile_csv), smk.output.hit_rate, profile["hit_rate_target"],
                  profile["recommendation"])
    plot_memory_speed(native, depths, smk.output.memory_speed, memory_summary)


def compare(smk) -> None:
    from .analysis.compare import build_compare, validate_compare
    from .analysis.stages import stage_times

    read = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    report = build_compare(_manifest(smk), read(smk.input.checksums), read(smk.input.native),
                           [read(p) for p in smk.input.depths], read(smk.input.profile), dict(smk.config),
                           [str(p) for p in smk.input.plots], stage_times(list(smk.input.benchmarks)),
                           [read(p) for p in smk.input.quantized])
    from .analysis.summary import to_html

    validate_compare(report, smk.input.schema)
    write_json(smk.output.json, report)
    with atomic_path(smk.output.html) as tmp:
        tmp.write_text(to_html(report))
    log.info("parity at full depth: tokens identical %s, max |dlogit| %.3g", report["parity"]["tokens_identical"],
             report["parity"]["max_abs_logit_diff"])
