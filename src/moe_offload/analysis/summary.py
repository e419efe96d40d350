"""compare.json as a table a person reads: HTML for the Snakemake report, plain text at the end of
`make run` (`python -m moe_offload.analysis.summary results/compare.json`)."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import pandas as pd

MIB = 2**20
COLUMNS = ["run", "prefill tok/s", "prefill bound", "decode tok/s", "decode bound", "vs native", "memory MiB", "bound MiB", "framework MiB",
           "hit rate", "top-1 agreement", "mean KL", "perplexity", "held-out ppl", "sample text"]


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _row(name: str, side: dict, vs_native: str, cache: dict | None, fidelity: dict | None) -> list:
    mem = side["memory"]
    return [name, _num(side["prefill_tok_s"], ".0f"), _num(side["prefill_tok_s_bound"], ".0f"),
            _num(side["tok_s"], ".1f"), _num(side["tok_s_bound"], ".0f"), vs_native,
            _num(mem["generate_peak_bytes"] / MIB, ".1f"), _num(mem["bound_bytes"] / MIB, ".1f"),
            _num(None if mem.get("framework_overhead_bytes") is None else mem["framework_overhead_bytes"] / MIB,
                 ".0f"),
            _num(cache["hit_rate"], ".3f") if cache else "",
            _num(fidelity["top1_agreement"], ".3f") if fidelity else "",
            _num(fidelity["mean_kl"], ".3g") if fidelity else "",
            _num(fidelity["perplexity"], ".1f") if fidelity else "",
            _num(fidelity.get("heldout_perplexity"), ".1f") if fidelity and fidelity.get("heldout_perplexity") else "",
            " ".join(side["sample_text"].split())[:60]]


def table(report: dict) -> pd.DataFrame:
    rows = [_row(f"native ({report['native']['model_class']})", report["native"], "1.00x", None, None)]
    for d in report["depths"]:
        name = f"depth {d['depth']}" + (" (truncated)" if d["truncated"] else " (full)")
        if d.get("bits", 16) != 16:
            name += f", {d.get('experts') or 'int' + str(d['bits'])}"
        ratio = f"{d['speedup_vs_native']:.2f}x" if d["speedup_vs_native"] is not None else "not comparable"
        rows.append(_row(name, d, ratio, d["cache"], d["fidelity"]))
    return pd.DataFrame(rows, columns=COLUMNS)


def notes(report: dict) -> list[str]:
    parity, profile, model = report["parity"], report["cache_profile"], report["model"]
    lines = [f"Model: {model['layout']}, {model['num_layers']} layers x {model['num_experts']} experts "
             f"(top-{model['experts_per_token']}), source {model['source']}; "
             f"{model['tensors_validated']} tensors validated byte for byte.",
             f"Parity at full depth ({parity['dtype']}): greedy tokens "
             f"{'identical' if parity['tokens_identical'] else 'DIFFERENT'} to native, "
             f"max |logit difference| {parity['max_abs_logit_diff']:.3g}.",
             f"Cache profile ({profile.get('dtype') or 'checkpoint'} bytes): {profile['recommendation']['text']}.",
             *([("Experts shared between modalities' prompt tokens (Jaccard, mean over layers): "
                 + ", ".join(f"{pair} {_num(v, '.2f')}" for pair, v in profile["modality_overlap"].items()) + ".")]
               if profile.get("modality_overlap") else []),
             "Memory is the model's own (peak during generation minus the process's baseline after imports), next "
             "to its bound (weights held + expert cache + KV cache); framework is what torch and transformers "
             "added before the model loaded. Truncated depths run fewer layers than native: their speed is not "
             "a speedup. Prefill tok/s = prompt tokens / prefill seconds (time to first token); its bound = the "
             "matmul rate / 2 x active parameters per token. Decode bound = memory read rate / bytes a token reads "
             "(its weights and the KV it attends over)."]
    heldout = [d["fidelity"].get("heldout_perplexity") for d in report["depths"]]
    if any(heldout):
        lines.append("Held-out ppl: each full-depth run's perplexity on fidelity.heldout's text (teacher-forced, in "
                     "windows of fidelity.heldout.window tokens), the model's own quality rather than its agreement "
                     "with native.")
    quant = report.get("quantization")
    if quant:
        lines.append(f"Quantized experts (int{quant['bits']} rows): group {quant['group_size']}, {quant['scales']} scales, "
                     f"{quant['experts']} experts in {quant['layers']} layers; mean relative error "
                     f"{quant['mean_rel_frobenius']:.4f} (round-to-nearest: "
                     f"{quant['mean_rel_frobenius_round_to_nearest']:.4f}), largest absolute error "
                     f"{quant['max_abs_error']:.3g}. Their fidelity is against native's 16-bit model.")
        hot = quant.get("hot")
        if hot:
            lines.append(f"Precision by popularity: {hot['experts']} experts ({len(hot['per_layer'])} layers) kept at "
                         f"int{hot['bits']}, the ones the full-depth run's router used most (results/experts_q*/"
                         f"hot.json); their error {hot['mean_rel_frobenius_hot']:.4f}, the rest's "
                         f"{hot['mean_rel_frobenius_rest']:.4f}. The cache's slots hold every expert at "
                         f"int{hot['bits']}: an int4 expert is widened as it is loaded, so only the host tier and the "
                         "link carry 4 bits.")
    native = report["native"]
    lines.append(f"Rates: memory read {native['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({native['bandwidth_source']}); "
                 f"matmul {native['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({native['matmul_source']}); "
                 "each run's bound uses the rates probed in its own job.")
    if model["source"] == "synthetic":
        lines.append("The synthetic checkpoint's weights are random unless trained: its sample text is not "
                     "expected to read as English.")
    return lines


KINDS_TITLE = "By prompt kind (native and the full depth)"
KINDS_NOTE = ("Time to first token includes the audio and vision towers (ours: towers s of it, run once per prompt "
              "outside the expert cache); decode tok/s after that prompt; hit rate over its prefill and decode.")


def kind_table(report: dict) -> pd.DataFrame:
    native = report["native"].get("by_kind") or {}
    full = next((d for d in report["depths"] if not d["truncated"]), {}).get("by_kind") or {}
    rows = []
    for kind, ours in full.items():
        theirs = native.get(kind, {})
        rows.append([kind, ours["prompts"], _num(theirs.get("ttft_s"), ".3f"), _num(ours["ttft_s"], ".3f"),
                     _num(ours["towers_s"], ".3f"), _num(theirs.get("tok_s"), ".1f"), _num(ours["tok_s"], ".1f"),
                     _num(ours["hit_rate"], ".3f")])
    return pd.DataFrame(rows, columns=["kind", "prompts", "native TTFT s", "ours TTFT s", "towers s",
                                       "native decode tok/s", "ours decode tok/s", "hit rate"])


STAGES_TITLE = "Where the time went"
STAGES_NOTE = ("Every job before this report, per rule, from Snakemake's benchmark files (results/benchmarks/): "
               "wall seconds summed over its jobs, and the largest resident memory of one job as Snakemake samples "
               "it (from the job's start, every 0.5 s, after 15 s every 30 s: a job under a second shows little "
               "more than its start; a dash: no sample).")


def stage_table(report: dict) -> pd.DataFrame:
    stages = report.get("stages") or []  # absent from a compare.json written before stage times
    total = sum(s["seconds"] for s in stages)
    rows = [[s["rule"], s["jobs"], _num(s["seconds"], ".1f"), _num(s["seconds"] / total if total else None, ".0%"),
             "-" if s["max_rss_mib"] is None else format(s["max_rss_mib"], ".0f")] for s in stages]
    if stages:
        rows.append(["total", sum(s["jobs"] for s in stages), _num(total, ".1f"), "", ""])
    return pd.DataFrame(rows, columns=["rule", "jobs", "seconds", "share", "max RSS MiB"])


def to_text(report: dict) -> str:
    text = table(report).to_string(index=False) + "\n\n" + "\n".join(notes(report)) + "\n"
    kinds = kind_table(report)
    if not kinds.empty:
        text += f"\n{KINDS_TITLE}:\n{kinds.to_string(index=False)}\n{KINDS_NOTE}\n"
    stages = stage_table(report)
    if not stages.empty:
        text += f"\n{STAGES_TITLE}:\n{stages.to_string(index=False)}\n{STAGES_NOTE}\n"
    return text


def to_html(report: dict) -> str:
    body = table(report).to_html(index=False, border=0, classes="compare", escape=True)
    paragraphs = "\n".join(f"<p>{html.escape(line)}</p>" for line in notes(report))
    kinds = kind_table(report)
    if not kinds.empty:
        paragraphs += (f"\n<h3>{KINDS_TITLE}</h3>\n"
                       f"{kinds.to_html(index=False, border=0, classes='compare', escape=True)}\n"
                       f"<p>{html.escape(KINDS_NOTE)}</p>")
    stages = stage_table(report)
    if not stages.empty:
        paragraphs += (f"\n<h3>{STAGES_TITLE}</h3>\n"
                       f"{stages.to_html(index=False, border=0, classes='compare', escape=True)}\n"
                       f"<p>{html.escape(STAGES_NOTE)}</p>")
    style = ("<style>body{font-family:sans-serif;margin:1em}table.compare{border-collapse:collapse}"
             "table.compare td,table.compare th{padding:4px 8px;border-bottom:1px solid #ccc;text-align:right}"
             "table.compare td:first-child{text-align:left}table.compare td:last-child{text-align:left;font-family:monospace}</style>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Native vs selective loading</title>"
            f"{style}</head><body>\n<h2>Native vs selective loading, side by side</h2>\n{body}\n{paragraphs}\n"
            "</body></html>\n")


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "results/compare.json")
    if not path.is_file():
        sys.exit(f"error: {path} does not exist (run `make run` first)")
    sys.stdout.write(to_text(json.loads(path.read_text())))
