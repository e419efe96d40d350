"""The comparison report: native against selective loading at each depth, side by side, every number
taken from the runs' own measurements and placed next to the bound it should be compared with."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jsonschema
import yaml

from ..errors import InputError
from .memory_summary import memory_summary
from .run_fields import expert_bits, expert_scheme

PACKAGES = ["torch", "transformers", "safetensors", "huggingface_hub", "snakemake", "xxhash", "pandas", "moe-offload"]
SAMPLE_CHARS = 160


def environment(config: dict, device: str) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "device": device, "packages": versions, "config_sha256": hashlib.sha256(blob).hexdigest()}


def _side(run: dict) -> dict:
    bound = run["speed_bound"]
    return {"load_s": run["load_s"], "tok_s": run["tok_s"], "tok_s_bound": bound["tok_s_bound"],
            "bytes_read_per_token": bound["bytes_read_per_token"], "kv_bytes_per_token": bound["kv_bytes_per_token"],
            "bandwidth_bytes_per_s": bound["bandwidth_bytes_per_s"], "bandwidth_source": bound["bandwidth_source"],
            "prefill_s": run["prefill_s"], "prompt_tokens": sum(len(p["input_ids"]) for p in run["prompts"]),
            "prefill_tok_s": run["prefill_tok_s"], "prefill_tok_s_bound": bound["prefill_tok_s_bound"],
            "prefill_flops_per_token": bound["prefill_flops_per_token"],
            "matmul_flops_per_s": bound["matmul_flops_per_s"], "matmul_source": bound["matmul_source"],
            "memory": memory_summary(run), "sample_text": run["prompts"][0]["text"][:SAMPLE_CHARS],
            "by_kind": by_kind(run["prompts"])}


def by_kind(prompts: list[dict]) -> dict:
    """Per prompt kind: time to first token (towers included), the towers' part, decode tok/s, hit rate."""
    kinds: dict[str, list[dict]] = {}
    for p in prompts:
        kinds.setdefault(p.get("kind", "text"), []).append(p)
    out = {}
    for kind, runs in kinds.items():
        decoded, decode_s = sum(max(len(p["output_ids"]) - 1, 0) for p in runs), sum(p["decode_s"] for p in runs)
        rates = [p["hit_rate"] for p in runs if p.get("hit_rate") is not None]
        out[kind] = {"prompts": len(runs), "ttft_s": sum(p["prefill_s"] for p in runs) / len(runs),
                     "towers_s": (sum(p["towers_s"] for p in runs) / len(runs)) if "towers_s" in runs[0] else None,
                     "tok_s": decoded / decode_s if decode_s > 0 else 0.0,
                     "hit_rate": sum(rates) / len(rates) if rates else None}
    return out


def build_compare(manifest: dict, checksums: dict, native: dict, depths: list[dict], profile: dict,
                  config: dict, plots: list[str], stages: list[dict], quantized: list[dict] = ()) -> dict:
    """depths: every depth run, 16-bit and quantized; quantized: each quantized layer's record."""
    depths = sorted(depths, key=lambda d: (-expert_bits(d), d["depth"]))
    full = [d for d in depths if d["depth"] == manifest["num_layers"] and expert_bits(d) == 16]
    if not full:
        raise InputError(f"no run at the full depth {manifest['num_layers']}: the parity verdict needs it")
    full = full[0]
    rows = []
    for run in depths:
        truncated = run["depth"] < manifest["num_layers"]
        # A truncated network does less work than native's whole one: a ratio of their speeds is no speedup.
        like_for_like = not truncated and native["tok_s"] > 0
        row = {"depth": run["depth"], "bits": expert_bits(run), "hot_bits": run.get("experts", {}).get("hot_bits"),
               "experts": expert_scheme(run), "truncated": truncated, **_side(run),
               "speedup_vs_native": run["tok_s"] / native["tok_s"] if like_for_like else None,
               "cache": {k: run["cache"][k] for k in ("capacity", "scope", "policy", "hits", "misses", "evictions",
                                                       "bytes_loaded", "load_seconds", "hit_rate")},
               "fidelity": {k: run["fidelity"].get(k) for k in ("top1_agreement", "mean_kl", "perplexity",
                                                                 "heldout_perplexity")}}
        rows.append(row)
    parity = {"depth": full["depth"], "dtype": full["dtype"],
              "max_abs_logit_diff": full["fidelity"]["max_abs_logit_diff"],
              "tokens_identical": full["fidelity"]["tokens_identical"],
              "first_difference": [p["first_difference"] for p in full["prompts"]]}
    return {
        "model": {k: manifest[k] for k in ("path", "layout", "num_layers", "num_experts", "experts_per_token")}
        | {"source": manifest["source"]["source"], "extraction_valid": bool(checksums.get("valid")),
           "tensors_validated": checksums["tensors"]},
        "environment": environment(config, native["device"]),
        "native": {**_side(native), "model_class": native["model_class"],
                   "experts_implementation": native["experts_implementation"]},
        "depths": rows,
        "parity": parity,
        "cache_profile": _profile_summary(profile),
        "plots": plots,
        "stages": stages,
        "quantization": _quantization(config.get("quantize", {}), quantized),
    }


def _quantization(settings: dict, records: list[dict]) -> dict | None:
    """The scheme and each expert's reconstruction error over every quantized layer (searched scales, and
    round-to-nearest's for the same experts: the search's gain); None when nothing was quantized."""
    if not records:
        return None
    experts = [e for r in records for e in r["experts"]]

    def mean(key, among=experts):
        return sum(e[key] for e in among) / len(among)

    bits = records[0]["bits"]
    hot = [e for e in experts if e.get("bits", bits) != bits]
    rest = [e for e in experts if e.get("bits", bits) == bits]
    return {"bits": bits, "group_size": records[0]["group_size"], "scales": records[0]["scales"],
            "layers": len(records), "experts": len(experts),
            # precision by popularity: which experts of each layer kept more bits (from the router trace)
            "hot": {"bits": records[0].get("hot_bits"), "experts": len(hot),
                    "per_layer": {r["layer"]: r.get("hot_experts", []) for r in records},
                    "mean_rel_frobenius_hot": mean("rel_frobenius", hot),
                    "mean_rel_frobenius_rest": mean("rel_frobenius", rest)} if hot else None,
            "mean_rel_frobenius": mean("rel_frobenius"),
            "mean_rel_frobenius_round_to_nearest": mean("rel_frobenius_round_to_nearest"),
            "max_abs_error": max(e["max_abs"] for e in experts),
            "settings": {k: settings.get(k) for k in ("bits", "group_size", "scales", "hot")}}


def _profile_summary(profile: dict) -> dict:
    summary = profile["summary"] if "summary" in profile else profile
    modalities = summary.get("modalities")
    overlap = {"modality_overlap": {pair: o["mean"] for pair, o in modalities["overlap"].items()}} if modalities else {}
    return overlap | {"hit_rate_target": profile.get("hit_rate_target"),
            "dtype": profile.get("dtype"),
            "tokens": summary.get("tokens"),
            "smallest_capacity_for_target": summary["smallest_capacity_for_target"],
            "recommendation": profile.get("recommendation")}


def validate_compare(report: dict, schema_path: str | Path) -> None:
    schema = yaml.safe_load(Path(schema_path).read_text())
    try:
        jsonschema.validate(report, schema)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(f"compare.json would not match its schema at {where}: {err.message}") from None
