"""The trained default: its training script, its checkpoint in the hub layout, and `model.source: embedded`."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from moe_offload.checkpoint.extracted import extract_all
from moe_offload.checkpoint.layouts import detect_checkpoint
from moe_offload.checkpoint.shards import Checkpoint
from moe_offload.checkpoint.validate import validate_all, validate_dense, validate_layer
from moe_offload.runtime.generate import load_runtime, teacher_forced_logits

from conftest import REPO, error_lines, set_config, snakemake

sys.path.insert(0, str(REPO / "training"))
import evaluate  # noqa: E402
import train_default  # noqa: E402

TINY = ["--num-layers", "4", "--hidden-size", "64", "--moe-intermediate-size", "32", "--head-dim", "16",
        "--steps", "24", "--dropout", "0", "--batch", "8", "--seq-len", "32", "--lr", "3e-3", "--eval-every", "12",
        "--heldout-windows", "8", "--max-shard-size", "64KB", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    assert train_default.main(TINY + ["--out", str(out)]) == 0
    return out, json.loads((out / "training.json").read_text())


def heldout_windows(ckpt, n=8, seq_len=32):
    tokenizer = train_default.load_tokenizer(ckpt / "tokenizer.json")
    return train_default.windows(train_default.token_stream(tokenizer, train_default.DATA / "heldout.txt"), seq_len)[:n]


@pytest.mark.slow
def test_training_lowers_heldout_loss(trained):
    _, report = trained
    before, after = report["heldout_loss_initial"]["4"], report["heldout_loss"]["4"]
    assert after < before - 0.5, (before, after)  # ~ln(4096) = 8.3 at the start
    assert report["steps"] == 24 and len(report["history"]) == 2
    assert report["heldout_perplexity"]["4"] == pytest.approx(2.718281828 ** after, rel=1e-3)


@pytest.mark.slow
def test_saved_checkpoint_is_the_trained_model_in_the_hub_layout(trained):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    ckpt, report = trained
    layout, cfg = detect_checkpoint(ckpt)
    assert (layout.name, cfg.num_layers, cfg.num_experts, cfg.experts_per_token) == ("qwen3_omni_thinker", 4, 16, 4)
    shards = Checkpoint(ckpt)
    assert "thinker.model.layers.3.mlp.experts.15.down_proj.weight" in shards.weight_map
    straddling = [L for L in range(4) if len({shards.weight_map[n] for n in layout.expert_names(L, 16)}) > 1]
    assert straddling, "small shards must split some layer's experts, as in the real checkpoint"
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        losses, _, _ = train_default.depth_losses(thinker, heldout_windows(ckpt), [1, 4])
    # the reported loss was of the float32 weights; the checkpoint holds them in bf16
    assert losses[4].item() == pytest.approx(report["heldout_loss"]["4"], abs=0.05)
    assert losses[1].item() == pytest.approx(report["heldout_loss"]["1"], abs=0.05)


@pytest.mark.slow
def test_trained_checkpoint_extracts_validates_and_runs_truncated_like_transformers(trained, tmp_path):
    ckpt, _ = trained
    ex = extract_all(ckpt, tmp_path)
    assert sorted(ex.layers) == [0, 1, 2, 3]
    reports = [validate_layer(ckpt, layer, path) for layer, path in ex.layers.items()]
    assert validate_all(ckpt, validate_dense(ckpt, ex.dense), reports)["valid"]
    # evaluate.py's depth-N figure (transformers, final norm and lm_head after layer N) is what the
    # runtime computes when it loads N layers
    window = heldout_windows(ckpt, n=1)[0].tolist()
    thinker = evaluate.load_thinker(ckpt)
    with torch.no_grad():
        out = thinker(input_ids=torch.tensor([window]), output_hidden_states=True)
        lm = thinker.model.language_model
        for depth in (1, 4):
            ours = teacher_forced_logits(load_runtime(ex.dense, ex.dir, ckpt, depth=depth),
                                         window[:1], window[1:])
            native = (out.logits if depth == 4 else thinker.lm_head(lm.norm(out.hidden_states[depth])))[0, :-1]
            assert (ours - native).abs().max().item() < 1e-3, depth


@pytest.mark.slow
def test_evaluate_reports_perplexity_by_depth_and_routing(trained):
    ckpt, _ = trained
    result = evaluate.evaluate(ckpt, depths=(1, 8), seq_len=32, max_windows=4, max_new_tokens=3)
    assert set(result["heldout_perplexity"]) == {1, 4}  # depths past the model dropped, the full one added
    routing = result["routing"]
    assert 4 <= routing["experts_for_90pct_mass"] <= 16 and len(routing["experts_for_90pct_mass_per_layer"]) == 4
    assert 0.0 <= routing["token_to_token_reuse"] <= 1.0
    assert all(len(texts) == len(evaluate.PROMPTS) for texts in result["samples"].values())


@pytest.mark.slow
def test_embedded_source_is_used_in_place(trained, workdir):
    ckpt, _ = trained
    if (workdir / "models").is_symlink():
        (workdir / "models").unlink()  # the repository's own models/ is linked: never write into it
    shutil.copytree(ckpt, workdir / "models/default")
    set_config(workdir, model={"source": "embedded"}, generate={"prompts": ["The hacker"], "max_new_tokens": 4})
    proc = snakemake(workdir, "--cores", "2", "results/compare.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((workdir / "results/checksums/all.json").read_text())["valid"]
    report = json.loads((workdir / "results/compare.json").read_text())
    assert report["model"]["source"] == "embedded" and report["parity"]["tokens_identical"]
    manifest = json.loads((workdir / "results/model/manifest.json").read_text())
    assert manifest["path"].endswith("models/default") and manifest["source"] == {"source": "embedded"}
    assert not (workdir / "results/model/checkpoint").exists()  # nothing built or copied
    again = snakemake(workdir, "--cores", "2", "results/compare.json")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_embedded_source_without_the_checkpoint_is_one_line(workdir):
    if (workdir / "models").is_symlink():
        (workdir / "models").unlink()
    set_config(workdir, model={"source": "embedded"})
    proc = snakemake(workdir, "-n", "results/compare.json")
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "models/default/config.json not found" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.skipif(not (REPO / "models/default/config.json").is_file(),
                    reason="the trained default is not committed yet (training/README.md)")
def test_committed_default_perplexity_falls_with_depth():
    result = evaluate.evaluate(REPO / "models/default", max_windows=8, max_new_tokens=0)
    ppl = result["heldout_perplexity"]
    assert list(ppl) == [1, 8, 16, 24, 48]
    assert ppl[48] < 0.8 * ppl[1], ppl
    for shallow, deep in zip(list(ppl)[:-1], list(ppl)[1:]):
        assert ppl[deep] <= 1.05 * ppl[shallow], ppl
    assert result["routing"]["experts_for_90pct_mass"] < 14  # random routers need ~14 of 16
