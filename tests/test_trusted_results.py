"""Nothing unverified is used, the config is checked at parse time and its key order reruns nothing,
numbers are like for like, and the results read as a table (issue 9)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from math import prod
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO, error_lines, set_config, snakemake, use_small_synthetic
from moe_offload import steps
from moe_offload.analysis.run_info import decode_rate, encode_prompt, prefill_rate, probe, speed_bound
from moe_offload.atomic import write_json
from moe_offload.checkpoint.layouts import detect_checkpoint
from moe_offload.checkpoint.shards import Checkpoint
from moe_offload.checkpoint.synthetic import build_synthetic, build_tokenizer
from moe_offload.config import reference
from moe_offload.errors import InputError
from moe_offload.resources import active_params, bytes_read_per_token
from moe_offload.runtime.generate import fidelity
from moe_offload.runtime.memory import MemoryMeter


# --- 2. nothing unverified is used -------------------------------------------------------------------

def _change_keeping_mtime(path: Path, offset: int) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_generation_refuses_a_file_changed_after_validation(workdir):
    use_small_synthetic(workdir, num_layers=2)
    target = "results/generate/depth_2.json"
    assert snakemake(workdir, "--cores", "2", target).returncode == 0
    for path, redo in (("results/experts/layer_1.safetensors", "results/experts/layer_1.safetensors"),
                       ("results/experts/dense.safetensors", "results/experts/dense.safetensors")):
        _change_keeping_mtime(workdir / path, -5)  # mtime kept: Snakemake sees nothing to redo
        proc = snakemake(workdir, "--cores", "2", "--forcerun", "generate_depth", "--", target)
        assert proc.returncode != 0
        lines = error_lines(proc)
        assert len(lines) == 1 and path in lines[0] and f"snakemake --forcerun {redo}" in lines[0], lines
        assert "Traceback" not in proc.stderr
        assert not (workdir / target).exists()
        # the command the message names redoes it
        assert snakemake(workdir, "--cores", "2", "--forcerun", redo, "--", target).returncode == 0


def test_nan_logits_fail_fidelity_and_json_is_strict(tmp_path):
    native = torch.randn(5, 32)
    ours = native.clone()
    ours[3, 7] = float("nan")
    with pytest.raises(InputError, match="ours logits hold NaN or inf"):
        fidelity(native, ours)
    ours[3, 7] = float("inf")
    with pytest.raises(InputError, match="NaN or inf"):
        fidelity(native, ours)
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"max_abs_logit_diff": math.nan})
    assert not list(tmp_path.iterdir())  # nothing at the final path, no temporary left


# --- 3. config ---------------------------------------------------------------------------------------

def _reverse_keys(value):
    if isinstance(value, dict):
        return {key: _reverse_keys(value[key]) for key in reversed(list(value))}
    return value


@pytest.mark.slow
def test_config_key_order_reruns_nothing(workdir):
    use_small_synthetic(workdir, num_layers=2)
    set_config(workdir, generate={"depths": [1]})
    assert snakemake(workdir, "--cores", "2", "results/compare.json").returncode == 0
    path = workdir / "config/config.yaml"
    path.write_text(yaml.safe_dump(_reverse_keys(yaml.safe_load(path.read_text())), sort_keys=False))
    plan = snakemake(workdir, "-n", "results/compare.json")
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout


@pytest.mark.parametrize("sections, needle", [
    ({"model": {"source": "synthetic", "synthetic": {"num_layers": 100000}}}, "model.synthetic.num_layers"),
    ({"generate": {"max_new_tokens": 10**9}}, "generate.max_new_tokens"),
    ({"model": {"source": "synthetic", "synthetic": {"experts_per_token": 20}}}, "experts_per_token (20)"),
    ({"model": {"source": "synthetic", "synthetic": {"num_heads": 5}}}, "num_heads (5) is not divisible"),
    ({"model": {"source": "synthetic", "synthetic": {"mlp_only_layers": [60]}}}, "mlp_only_layers names layer 60"),
    ({"cache": {"capacity": 99}}, "cache.capacity (99)"),
    ({"profile": {"capacities": [4, 32]}}, "profile.capacities holds 32"),
    ({"generate": {"prompts": []}}, "generate.prompts"),
])
def test_bad_config_is_one_line_at_parse_time(workdir, sections, needle):
    cfg = yaml.safe_load((workdir / "config/config.yaml").read_text())
    for key, value in sections.items():
        if key == "model":
            value = {**cfg["model"], **value, "synthetic": {**cfg["model"]["synthetic"], **value["synthetic"]}}
        set_config(workdir, **{key: value})
    proc = snakemake(workdir, "-n", "results/compare.json")
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_killed_synthetic_build_leaves_no_temporary_forever(tmp_path):
    out = tmp_path / "model" / "checkpoint"
    stale = tmp_path / "model" / ".checkpoint.abc123"  # what a killed build leaves (mkdtemp, mode 0700)
    stale.mkdir(parents=True, mode=0o700)
    (stale / "model-00001.safetensors").write_bytes(b"partial")
    build_synthetic(out, {"layout": "qwen3_moe", "num_layers": 1, "num_experts": 2, "experts_per_token": 1,
                          "hidden_size": 8, "moe_intermediate_size": 4, "num_heads": 2, "num_kv_heads": 1,
                          "head_dim": 4, "seed": 0, "max_shard_size": "1MB"})
    assert not stale.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["checkpoint"]


# --- 4. honest numbers -------------------------------------------------------------------------------

def test_memory_meter_phases_measure_over_the_baseline():
    """A phase's peak is what it allocated over the meter's baseline, and the next phase starts afresh
    (where the kernel can reset its high-water mark): the benchmarks' peak memory and the report's."""
    meter = MemoryMeter(torch.device("cpu"))
    held = torch.ones(2**26)  # 256 MiB, every page touched
    del held
    first = meter.end_phase("generate")
    second = meter.end_phase("after")
    assert first["peak_over_baseline_bytes"] >= 250 * 2**20
    assert meter.report({"total_bytes": 2**28})["generate_peak_over_baseline_bytes"] == first["peak_over_baseline_bytes"]
    if not second["peak_is_since_start"]:
        assert second["peak_over_baseline_bytes"] < 100 * 2**20


def test_bytes_read_per_token_counts_the_text_model(omni_ckpt):
    """With every expert routed, one token reads every weight of the text model but the embedding table,
    of which it reads one row: count that from the checkpoint's own headers."""
    layout, cfg = detect_checkpoint(omni_ckpt)
    ckpt = Checkpoint(omni_ckpt)
    params = sum(prod(ckpt.info(name).shape) for name in ckpt.weight_map if layout.in_component(name))
    params -= cfg.vocab_size * cfg.hidden_size - cfg.hidden_size  # one embedding row
    all_experts = dataclasses.replace(cfg, experts_per_token=cfg.num_experts)
    assert bytes_read_per_token(all_experts, cfg.num_layers, torch.float32) == 4 * params
    assert bytes_read_per_token(cfg, 1, torch.bfloat16) < bytes_read_per_token(cfg, 2, torch.bfloat16)


@pytest.mark.parametrize("ckpt", ["omni_ckpt", "qwen3_moe_ckpt"])
def test_prefill_flops_are_what_transformers_multiplies(ckpt, request):
    """2 x active parameters x prompt tokens is every matmul flop of transformers' own forward over the
    prompt (eager experts: only the routed ones run) but lm_head's, which runs once per prompt in our
    prefill (the Omni thinker's forward ignores logits_to_keep and runs it at every position)."""
    from torch.utils.flop_counter import FlopCounterMode

    from moe_offload.runtime.native import load_native

    path = request.getfixturevalue(ckpt)
    _, cfg = detect_checkpoint(path)
    model = load_native(path, torch.device("cpu"), torch.float32, "eager")
    tokens = 7
    with torch.inference_mode(), FlopCounterMode(display=False, depth=2) as counter:
        model(input_ids=torch.arange(10, 10 + tokens)[None], logits_to_keep=1)
    counts = counter.get_flop_counts()

    def matmuls(module: str) -> int:
        return sum(v for op, v in counts[module].items() if str(op) in ("aten.mm", "aten.addmm"))

    lm_head = matmuls(next(name for name in counts if name.endswith(".lm_head")))
    assert lm_head in (2 * cfg.vocab_size * cfg.hidden_size * n for n in (1, tokens))
    assert matmuls("Global") - lm_head == 2 * tokens * active_params(cfg, cfg.num_layers)


def test_cpu_bounds_come_from_rates_probed_here(omni_ckpt):
    """On the CPU no bound is n/a: the read rate and the matmul rate are measured in the job, quickly,
    and the bounds divide them by the bytes and flops one token needs (its KV included)."""
    _, cfg = detect_checkpoint(omni_ckpt)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    probes = probe(cpu, torch.float32)
    assert time.perf_counter() - start < 5  # the default run times seven jobs: each probe stays short
    read, matmul = probes["read"], probes["matmul"]
    assert read["bytes"] >= 256 * 2**20 and 1e8 < read["bytes_per_second"] < 1e13
    assert 1e7 < matmul["flops_per_second"] < 1e14
    # two prompts of 5 and 3 tokens, 4 and 1 tokens out: decode steps attend over 6, 7, 8 positions
    runs = [{"input_ids": [1] * 5, "output_ids": [2] * 4, "prefill_s": 0.5, "decode_s": 1.0},
            {"input_ids": [1] * 3, "output_ids": [2], "prefill_s": 0.5, "decode_s": 0.0}]
    bound = speed_bound(cfg, 2, torch.float32, cpu, runs, probes)
    kv = 2 * 2 * cfg.num_kv_heads * cfg.head_dim * 4 * 7  # K and V, 2 layers, float32, 7 positions on average
    assert bound["kv_bytes_per_token"] == kv
    assert bound["bytes_read_per_token"] == bytes_read_per_token(cfg, 2, torch.float32) + kv
    assert bound["bandwidth_bytes_per_s"] == read["bytes_per_second"] and "probed" in bound["bandwidth_source"]
    assert bound["tok_s_bound"] == pytest.approx(read["bytes_per_second"] / (bytes_read_per_token(cfg, 2, torch.float32) + kv))
    assert bound["prefill_tok_s_bound"] == pytest.approx(matmul["flops_per_second"] / (2 * active_params(cfg, 2)))
    assert prefill_rate(runs) == 8 and decode_rate(runs) == 3


def test_chat_template_wraps_prompts_when_the_tokenizer_has_one(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="no chat template"):
        encode_prompt(tok, "The sky", True)
    assert encode_prompt(tok, "The sky", None) == tok("The sky")["input_ids"]
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    wrapped = tok("<|im_start|>user\nThe sky<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert encode_prompt(tok, "The sky", None) == wrapped
    assert encode_prompt(tok, "The sky", True) == wrapped
    assert encode_prompt(tok, "The sky", False) == tok("The sky")["input_ids"]


# --- 5. logs -----------------------------------------------------------------------------------------

def test_log_keeps_progress_bars_and_stderr(tmp_path):
    log_path = tmp_path / "job.log"
    smk = SimpleNamespace(log=[str(log_path)])

    def step(smk):
        with steps.progress_bar(smk, 3, "file", "hashing files") as bar:
            bar.update(3)
        steps.log.info("step message")
        print("a library warning", file=sys.stderr)
        raise InputError("the layer file is bad")

    with pytest.raises(SystemExit):
        steps.run_step(smk, step)
    text = log_path.read_text()
    for needle in ("hashing files: 100%", "step message", "a library warning", "error: the layer file is bad"):
        assert needle in text, text
    assert sys.stderr is sys.__stderr__ or not hasattr(sys.stderr, "streams")  # restored


# --- 7. files a user expects -------------------------------------------------------------------------

def test_config_reference_is_current_and_describes_every_key():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert (REPO / "docs/config.md").read_text() == reference(schema), "run `make docs`"

    def leaves(node, path):
        for key, sub in node.get("properties", {}).items():
            yield from leaves(sub, f"{path}.{key}") if "properties" in sub else [(f"{path}.{key}", sub)]

    for schema_file in ("config.schema.yaml", "compare.schema.yaml"):
        doc = yaml.safe_load((REPO / "workflow/schemas" / schema_file).read_text())
        nodes = [doc] + list(doc.get("$defs", {}).values())
        undescribed = [name for node in nodes for name, sub in leaves(node, "") if not sub.get("description")]
        assert not undescribed, f"{schema_file}: {undescribed}"
    assert "MIT" in (REPO / "LICENSE").read_text() and (REPO / "CHANGELOG.md").is_file()


def test_summary_command_without_results_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_offload.analysis.summary", str(tmp_path / "none.json")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ") and "\n" not in proc.stderr.strip()
