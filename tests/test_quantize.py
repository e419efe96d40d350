"""Quantized experts: the format against a plain torch reference, quantized layer files through the runtime
against transformers' own model carrying the same dequantized weights, a corrupted file refused, bad
settings refused at plan time, and the main job at 4 bits."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen3MoeForCausalLM

from moe_offload.hashing import verify_files
from moe_offload.checkpoint.layouts import PROJECTIONS, detect_checkpoint
from moe_offload.checkpoint.quantize import (check_scheme, dequantize, pack, qweight_name, quantize, quantize_layer,
                                             scales_name, unpack)
from moe_offload.checkpoint.extracted import build_and_extract
from moe_offload.errors import InputError
from moe_offload.hashing import hash_file
from moe_offload.runtime.generate import generate, load_runtime

from conftest import REPO, error_lines, set_config, small_spec, snakemake, use_small_synthetic
from test_pipeline import _jobs

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/compare.schema.yaml").read_text())


def reference_round_to_nearest(w: torch.Tensor, bits: int, group: int):
    """Group-wise symmetric round-to-nearest written element by element in the plainest torch: each group's
    scale its largest magnitude over qmax, stored in float16."""
    qmax, qmin = (127, -127) if bits == 8 else (7, -8)
    out, cols = w.shape
    q = torch.empty(out, cols, dtype=torch.int8)
    scales = torch.empty(out, cols // group, dtype=torch.float16)
    for r in range(out):
        for g in range(cols // group):
            block = w[r, g * group:(g + 1) * group].float()
            s = torch.tensor(max(block.abs().max().item() / qmax, torch.finfo(torch.float16).tiny)).half()
            scales[r, g] = s
            q[r, g * group:(g + 1) * group] = torch.clamp(torch.round(block / s.float()), qmin, qmax).to(torch.int8)
    return q, scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [16, 32])
def test_round_to_nearest_and_its_round_trip_match_a_plain_reference(bits, group):
    torch.manual_seed(bits * group)
    w = (torch.randn(12, 64) * 0.05).to(torch.bfloat16)
    w[3, 5] = 0.9  # an outlier in one group
    w[7, :group] = 0  # an all-zero group
    q, s = quantize(w, bits, group, search=False)
    ref_q, ref_s = reference_round_to_nearest(w, bits, group)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    packed = pack(q, bits)
    assert packed.shape == (12, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), q)
    if bits == 4:  # the even input column in the low nibble, as q + 8
        assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)
    deq = dequantize(packed, s, bits)
    expected = ref_q.float() * ref_s.float().repeat_interleave(group, 1)
    assert torch.equal(deq, expected)
    # round to nearest: no value is off by more than half its group's step
    step = ref_s.float().repeat_interleave(group, 1)
    assert ((deq - w.float()).abs() <= step / 2 + 1e-6).all()
    assert (deq[7, :group] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_searched_scales_are_never_worse_than_round_to_nearest(bits):
    torch.manual_seed(1)
    w = torch.randn(32, 128) * 0.02
    w[torch.rand_like(w) < 0.01] *= 8  # heavy tails, where clipping pays
    err = {}
    for search in (False, True):
        q, s = quantize(w, bits, 32, search)
        d = dequantize(pack(q, bits), s, bits)
        err[search] = (d - w).view(32, 4, 32).pow(2).sum(-1)
    assert (err[True] <= err[False] + 1e-12).all()
    if bits == 4:
        assert err[True].sum() < 0.95 * err[False].sum()


@pytest.mark.parametrize("bits, group, dims, message", [
    (3, 64, {}, "quantize bits must be 16, 8 or 4, got 3"),
    (4, 48, {"expert intermediate size": 64}, "quantize group_size 48 does not divide the expert intermediate size (64)"),
    (8, 7, {}, "quantize group_size must be an even whole number of at least 2, got 7"),
])
def test_impossible_schemes_are_one_line(bits, group, dims, message):
    with pytest.raises(InputError) as err:
        check_scheme(bits, group, dims)
    assert str(err.value) == message


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    spec = small_spec("qwen3_moe", num_layers=4, mlp_only_layers=[1], max_shard_size="1MB")
    ex = build_and_extract(spec, tmp_path_factory.mktemp("quant"))
    return ex.dir, ex.ckpt, ex.config


def _quantized(extracted, bits, group=16, hot=None):
    """hot: {layer: experts} kept at 8 bits (the rest at `bits`)."""
    root, ckpt, cfg = extracted
    out = root / (f"q{bits}" if hot is None else f"q{bits}h8")
    records = {layer: quantize_layer(root / f"layer_{layer}.safetensors", out / f"layer_{layer}.safetensors", bits,
                                     group, hot=None if hot is None else (8, hot[layer]))
               for layer in cfg.expert_layers}
    return out, records


def _reference_with(ckpt, cfg, qdir):
    """transformers' own model with each expert's weights replaced by what the quantized file decodes to."""
    layout, _ = detect_checkpoint(ckpt)
    ref = Qwen3MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in cfg.expert_layers:
            with safe_open(qdir / f"layer_{layer}.safetensors", framework="pt") as f:
                # each expert at its own bits (precision by popularity): int8 stored as int8, int4 as bytes
                qw = {(e, p): f.get_tensor(qweight_name(layout.expert(layer, e, p)))
                      for e in range(cfg.num_experts) for p in PROJECTIONS}
                weights = [[dequantize(qw[e, p], f.get_tensor(scales_name(layout.expert(layer, e, p))),
                                       8 if qw[e, p].dtype == torch.int8 else 4)
                            for p in PROJECTIONS] for e in range(cfg.num_experts)]
            experts = ref.model.layers[layer].mlp.experts
            experts.gate_up_proj.copy_(torch.stack([torch.cat(w[:2]) for w in weights]))
            experts.down_proj.copy_(torch.stack([w[2] for w in weights]))
    return ref


def _transformers_run(ckpt, cfg, qdir, steps: int):
    """(prompt ids, transformers' greedy generate on the dequantized weights, with its logits)."""
    ref = _reference_with(ckpt, cfg, qdir)
    ids = AutoTokenizer.from_pretrained(ckpt)("Once upon a time there was a small robot", return_tensors="pt").input_ids
    with torch.inference_mode():
        return ids, ref.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_files_give_transformers_tokens_on_the_same_weights(extracted, bits):
    root, ckpt, cfg = extracted
    qdir, records = _quantized(extracted, bits)
    for layer, record in records.items():
        assert record["file_xxh3_128"] == hash_file(qdir / f"layer_{layer}.safetensors")
        assert len(record["experts"]) == cfg.num_experts
        for e in record["experts"]:
            assert 0 < e["rel_frobenius"] <= e["rel_frobenius_round_to_nearest"] + 1e-12
    # bits per weight plus a 16-bit scale per 16 weights, against bf16 (and the header's longer names)
    size = (qdir / "layer_0.safetensors").stat().st_size / (root / "layer_0.safetensors").stat().st_size
    assert size < (bits + 16 / 16) / 16 + 0.06
    ids, theirs = _transformers_run(ckpt, cfg, qdir, 16)
    expected = theirs.sequences[0, ids.shape[1]:].tolist()
    for capacity in (cfg.num_experts, 6):
        rt = load_runtime(root / "dense.safetensors", qdir, ckpt, capacity=capacity, use_kernels=False)
        assert rt.cache.bits == bits
        # the slots hold the stored form: bits per weight and a float16 scale per group, not float32
        assert rt.cache.bytes_per_expert == cfg.expert_params * bits // 8 + cfg.expert_params // 16 * 2
        for path in ("careful", "graph", "pipelined"):
            gen = generate(rt, ids, 16, return_logits=True, path=path)
            assert gen.tokens[0] == expected, (capacity, path)
            for ours, logits in zip(gen.logits, theirs.logits):
                assert (ours[0] - logits[0]).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_misses_read_from_the_host_tier_in_place_give_transformers_tokens(extracted, bits):
    """The fused kernels (Triton's interpreter here) with the host tier and a cache of 6 of 16: absent
    quantized experts are read from the host tier in place inside the decode step, as stored, not copied
    into a slot first; transformers' tokens on the same (dequantized) weights, and the slots end up
    holding the stored bytes."""
    from moe_offload.runtime import kernels

    if not kernels.available(torch.device("cpu")):
        pytest.fail("needs triton with TRITON_INTERPRET=1 (set in conftest)")
    root, ckpt, cfg = extracted
    qdir, _ = _quantized(extracted, bits)
    steps = 8
    ids, theirs = _transformers_run(ckpt, cfg, qdir, steps)
    rt = load_runtime(root / "dense.safetensors", qdir, ckpt, capacity=6, use_kernels=True, host_tier=True)
    assert rt.step.in_place and rt.cache.bits == bits
    gen = generate(rt, ids, steps, return_logits=True, path="pipelined")
    assert gen.tokens[0] == theirs.sequences[0, ids.shape[1]:].tolist()
    for ours, logits in zip(gen.logits, theirs.logits):
        assert (ours[0] - logits[0]).abs().max().item() <= 1e-4
    assert gen.decode_stats["misses"] > 0 and gen.decode_stats["load_seconds"] == 0  # read inside the step
    layer = cfg.expert_layers[0]
    w1, w2, table = rt.cache.slabs(layer)
    s1, s2, _, _ = rt.cache.quant_slabs(layer)
    with safe_open(qdir / f"layer_{layer}.safetensors", framework="pt") as f:
        layout, _ = detect_checkpoint(ckpt)
        for expert, slot in ((e, s) for e, s in enumerate(table.tolist()) if s >= 0):
            name = lambda p: layout.expert(layer, expert, p)  # noqa: E731
            assert torch.equal(w1[slot], torch.cat([f.get_tensor(qweight_name(name(p))) for p in PROJECTIONS[:2]]))
            assert torch.equal(s2[slot], f.get_tensor(scales_name(name(PROJECTIONS[2]))))


def test_hot_experts_at_8_bits_beside_int4_give_transformers_tokens_on_the_same_weights(extracted):
    """Precision by popularity: each layer's hot experts int8, the rest int4, in one file (each expert's
    tensors in its own dtype, the hot list in the metadata). The slots hold int8 and widen an int4 expert
    as it is copied in: transformers' tokens on the same dequantized weights, through the PyTorch path and
    the Triton kernels (interpreter), with a cache small enough to miss."""
    root, ckpt, cfg = extracted
    hot = {layer: [layer % 3, 5, 11] for layer in cfg.expert_layers}
    qdir, records = _quantized(extracted, 4, hot=hot)
    for layer, record in records.items():
        assert record["hot_bits"] == 8 and record["hot_experts"] == sorted(hot[layer])
        assert [e["bits"] for e in record["experts"]] == [8 if e in hot[layer] else 4 for e in range(cfg.num_experts)]
    int4, _ = _quantized(extracted, 4)
    grown = (qdir / "layer_0.safetensors").stat().st_size - (int4 / "layer_0.safetensors").stat().st_size
    assert 0 <= grown - 3 * cfg.expert_params // 2 < 512  # 3 experts at a byte a weight, not half (and the header)
    ids, theirs = _transformers_run(ckpt, cfg, qdir, 8)
    expected = theirs.sequences[0, ids.shape[1]:].tolist()
    for capacity, kernels in ((cfg.num_experts, False), (6, False), (6, True)):
        rt = load_runtime(root / "dense.safetensors", qdir, ckpt, capacity=capacity, use_kernels=kernels,
                          host_tier=kernels)
        assert rt.cache.bits == 8  # the slots' precision
        assert rt.cache.bytes_per_expert == cfg.expert_params + cfg.expert_params // 16 * 2
        gen = generate(rt, ids, 8, return_logits=True, path="pipelined")
        assert gen.tokens[0] == expected, (capacity, kernels)
        for ours, logits in zip(gen.logits, theirs.logits):
            assert (ours[0] - logits[0]).abs().max().item() <= 1e-4
    assert not rt.step.in_place  # mixed files are copied into their slots, widened


def test_a_corrupted_quantized_file_is_refused(extracted, tmp_path):
    qdir, records = _quantized(extracted, 4)
    path = qdir / "layer_2.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match its recorded xxh3-128"):
        verify_files([(path, records[2]["file_xxh3_128"], str(path))])
    # a header that no longer says what the runtime reads: one line naming the file
    root, ckpt, cfg = extracted
    bad = tmp_path / "layer_0.safetensors"
    raw = (qdir / "layer_0.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[scales_name("model.layers.0.mlp.experts.3.up_proj.weight")]["dtype"] = "BF16"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(InputError, match=r"layer_0.safetensors: .*experts.3.up_proj.scales is BF16, expected F16"):
        load_runtime(root / "dense.safetensors", {0: bad, 2: qdir / "layer_2.safetensors",
                                                  3: qdir / "layer_3.safetensors"}, ckpt)


@pytest.mark.parametrize("quant, line", [
    ({"bits": 3}, "error: invalid config value at quantize.bits: 3 is not one of [16, 8, 4]"),
    ({"bits": 4, "group_size": 48}, "error: quantize.group_size 48 does not divide the hidden size (64)"),
    ({"bits": 8, "group_size": 40}, "error: quantize.group_size 40 does not divide the hidden size (64)"),
    ({"bits": 4, "hot": {"fraction": 1.5}},
     "error: invalid config value at quantize.hot.fraction: 1.5 is greater than the maximum of 1"),
    ({"bits": 4, "hot": {"fraction": -0.1}},
     "error: invalid config value at quantize.hot.fraction: -0.1 is less than the minimum of 0"),
    ({"bits": 8, "group_size": 16, "hot": {"fraction": 0.25}},
     "error: quantize.hot.bits 8 above bits 8: precision by popularity runs int8 hot experts beside int4 ones "
     "(bits 4, hot.bits 8)"),
    ({"bits": 4, "hot": {"bits": 16, "fraction": 0.25}},
     "error: invalid config value at quantize.hot.bits: 16 is not one of [8]"),
])
def test_bad_quantize_settings_fail_at_plan_time(workdir, quant, line):
    use_small_synthetic(workdir)
    set_config(workdir, quantize=quant)
    proc = snakemake(workdir, "-n", "results/compare.json")
    assert proc.returncode != 0
    assert error_lines(proc) == [line]


@pytest.mark.slow
def test_main_job_at_4_bits_reports_fidelity_per_bit_width(workdir):
    use_small_synthetic(workdir, num_layers=4)
    set_config(workdir, quantize={"bits": 4, "group_size": 16}, generate={"depths": [1, 4]})
    proc = snakemake(workdir, "--cores", "2", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "results/compare.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert [(d["bits"], d["depth"]) for d in report["depths"]] == [(16, 1), (16, 4), (4, 1), (4, 4)]
    full16, full4 = report["depths"][1], report["depths"][3]
    assert report["parity"]["tokens_identical"]  # the 16-bit full depth stays the parity check
    assert full16["fidelity"]["top1_agreement"] == 1.0
    assert 0 < full4["fidelity"]["mean_kl"] and full4["fidelity"]["top1_agreement"] > 0.5
    assert full4["bytes_read_per_token"] < full16["bytes_read_per_token"]
    quant = report["quantization"]
    assert (quant["bits"], quant["group_size"], quant["layers"]) == (4, 16, 4)
    assert quant["mean_rel_frobenius"] < quant["mean_rel_frobenius_round_to_nearest"]
    assert (workdir / "results/plots/quality_bytes.png").stat().st_size > 10_000
    printed = subprocess.run([sys.executable, "-m", "moe_offload.analysis.summary", "results/compare.json"],
                             cwd=workdir, capture_output=True, text=True)
    assert "depth 4 (full), int4" in printed.stdout and "Quantized experts (int4 rows)" in printed.stdout
    # a named target per layer; a changed group size requantizes and reruns the quantized depths only
    assert snakemake(workdir, "-n", "quantize_layer_2").returncode == 0
    set_config(workdir, quantize={"bits": 4, "group_size": 32})
    jobs = _jobs(snakemake(workdir, "-n", "results/compare.json").stdout)
    assert {"quantize_layer", "generate_depth_quantized"} <= jobs
    assert not jobs & {"extract_layer", "validate_layer", "generate_depth", "generate_native_reference"}

    # precision by popularity: the 4 of 16 experts per layer the full-depth run's router used most at int8
    set_config(workdir, quantize={"bits": 4, "group_size": 16, "hot": {"bits": 8, "fraction": 0.25}})
    jobs = _jobs(snakemake(workdir, "-n", "results/compare.json").stdout)
    assert {"hot_experts", "quantize_layer", "generate_depth_quantized"} <= jobs
    assert not jobs & {"extract_layer", "validate_layer", "generate_depth", "generate_native_reference"}
    proc = snakemake(workdir, "--cores", "2", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    uses = pd.read_parquet(workdir / "results/traces/depth_4.parquet").explode("experts")
    hot = json.loads((workdir / "results/experts_q4h8/hot.json").read_text())["per_layer"]
    for layer, group in uses.groupby("layer"):
        counts = group["experts"].value_counts()
        most = sorted(range(16), key=lambda e: (-counts.get(e, 0), e))[:4]
        assert hot[str(layer)] == sorted(most)
        record = json.loads((workdir / f"results/experts_q4h8/layer_{layer}.json").read_text())
        assert [e["bits"] for e in record["experts"]] == [8 if e in most else 4 for e in range(16)]
    mixed = json.loads((workdir / "results/compare.json").read_text())
    jsonschema.validate(mixed, SCHEMA)
    assert [(d["experts"], d["depth"]) for d in mixed["depths"][2:]] == [("int4 + int8 hot (4/layer)", 1),
                                                                         ("int4 + int8 hot (4/layer)", 4)]
    assert mixed["quantization"]["hot"]["experts"] == 16 and mixed["quantization"]["hot"]["bits"] == 8
    # int8 experts reconstruct better: the whole file's error falls below int4's alone
    assert mixed["quantization"]["mean_rel_frobenius"] < quant["mean_rel_frobenius"]
    printed = subprocess.run([sys.executable, "-m", "moe_offload.analysis.summary", "results/compare.json"],
                             cwd=workdir, capture_output=True, text=True)
    assert "depth 4 (full), int4 + int8 hot (4/layer)" in printed.stdout
    assert "Precision by popularity: 16 experts (4 layers) kept at int8" in printed.stdout


def test_memory_plan_of_the_real_thinker_per_bit_width():
    from moe_offload.analysis.device_fit import MACHINES, Scheme, fit, table
    from moe_offload.checkpoint.dims import THINKER_TEXT
    from moe_offload.checkpoint.layouts import text_config_from_dict
    from moe_offload.resources import quantized_expert_bytes

    cfg = text_config_from_dict(THINKER_TEXT)
    weights = 3 * 2048 * 768  # one expert's gate, up and down
    assert quantized_expert_bytes(cfg, 16, 128) == 2 * weights
    assert quantized_expert_bytes(cfg, 8, 128) == weights + weights // 128 * 2
    assert quantized_expert_bytes(cfg, 4, 128) == weights // 2 + weights // 128 * 2
    nano, desktop, thor = MACHINES
    rows = {(s.bits, s.hot_bits, m.name): fit(cfg, s, m) for s in (Scheme(16), Scheme(8), Scheme(4)) for m in MACHINES}
    # all 48 x 128 experts: 58 GB in bf16, a quarter of that plus scales in int4
    assert abs(rows[(16, None, thor.name)]["experts_bytes"] - 48 * 128 * 2 * weights) < 1
    assert rows[(16, None, thor.name)]["resident"] and rows[(4, None, desktop.name)]["resident"]
    assert not rows[(16, None, desktop.name)]["resident"] and rows[(16, None, desktop.name)]["capacity"] >= 8
    assert rows[(16, None, nano.name)]["capacity"] is None  # not even 8 experts a layer beside the dense weights
    resident = rows[(4, None, desktop.name)]
    assert resident["tok_s_bound"] == desktop.read_bytes_per_s / resident["token_bytes"]
    cached = rows[(8, None, desktop.name)]  # its misses' bytes over the link slow it below the resident bound
    assert cached["tok_s_bound"] < desktop.read_bytes_per_s / cached["token_bytes"]
    assert "mixed: 25% int8, rest int4" in table(cfg) and "Jetson AGX Thor" in table(cfg)
