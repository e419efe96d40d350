"""Audio and images through the selective runtime against transformers' own thinker
(Qwen3OmniMoeThinkerForConditionalGeneration) on the same checkpoint, float32 on the CPU.

Every expected value comes from transformers: its greedy tokens and step logits from generate(), its
teacher-forced logits, its get_rope_index. The prompts' audio and images are made here (tones, noise,
gradients). Checkpoints: the embedded default (trained text model, random towers) and a synthetic one of
odd dims (head_dim 12, hidden 48, 10 experts, top-3, a dense layer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

from moe_offload.checkpoint.extract import extract_dense, extract_layer, extract_towers
from moe_offload.checkpoint.layouts import detect_checkpoint
from moe_offload.checkpoint.synthetic import build_synthetic
from moe_offload.errors import InputError
from moe_offload.runtime import cache_policy
from moe_offload.runtime.fused_step import TRITON_OPS
from moe_offload.runtime.generate import generate, load_runtime, teacher_forced_logits
from moe_offload.media_files import check_audio, check_image, read_audio
from moe_offload.runtime.media import MediaProcessor, rope_positions
from moe_offload.sample_media import gradient, noise, noise_image, tone, write_image, write_wav

REPO = Path(__file__).resolve().parents[1]
ODD = dict(layout="qwen3_omni_thinker", num_layers=3, num_experts=10, experts_per_token=3, hidden_size=48,
           moe_intermediate_size=24, num_heads=4, num_kv_heads=2, head_dim=12, mlp_only_layers=[1], seed=1,
           max_shard_size="256KB")
NEW_TOKENS = 12
TOL = 1e-4


def media_files(folder: Path) -> dict:
    return dict(tone=write_wav(folder / "tone.wav", tone(1.3)),
                noise=write_wav(folder / "noise.wav", noise(0.7), width=4),
                gradient=write_image(folder / "gradient.png", gradient(64, 96)),
                speckle=write_image(folder / "speckle.jpg", noise_image(96, 64)))


KINDS = {"text+audio": (["tone"], []), "text+image": ([], ["gradient"]), "text+audio+image": (["noise"], ["speckle"])}


@pytest.fixture(scope="module", params=["default", "odd"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"media_{request.param}")
    ckpt = REPO / "models" / "default" if request.param == "default" else build_synthetic(root / "ckpt", ODD)
    _, cfg = detect_checkpoint(ckpt)
    extract_dense(ckpt, root / "dense.safetensors")
    extract_towers(ckpt, root / "towers.safetensors")
    for layer in cfg.expert_layers:
        extract_layer(ckpt, layer, root / f"layer_{layer}.safetensors")
    files, proc = media_files(root), MediaProcessor(ckpt)
    ref = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    cases = {}
    with torch.inference_mode():
        for kind, (audio, images) in KINDS.items():
            prompt = proc("What do you hear and see?", [files[a] for a in audio], [files[i] for i in images])
            ids = torch.tensor([prompt.input_ids])
            ones = torch.ones_like(ids)
            out = ref.generate(input_ids=ids, attention_mask=ones, **prompt.native_kwargs(), max_new_tokens=NEW_TOKENS,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
            seq = out.sequences
            forced = ref(input_ids=seq, attention_mask=torch.ones_like(seq), **prompt.native_kwargs()).logits[0]
            cases[kind] = dict(prompt=prompt, tokens=seq[0, ids.shape[1]:].tolist(),
                               step_logits=[l[0] for l in out.logits], forced=forced[ids.shape[1] - 1:-1])
    runtime = lambda **kw: load_runtime(root / "dense.safetensors", root, ckpt, towers_path=root / "towers.safetensors",
                                        **kw)
    return dict(name=request.param, ckpt=ckpt, cfg=cfg, ref=ref, proc=proc, cases=cases, runtime=runtime,
                files=files)


def max_delta(ours, theirs) -> float:
    return max((a[0] - b).abs().max().item() for a, b in zip(ours, theirs))


def test_prompts_hold_their_placeholders(model):
    """Each kind expands its placeholders to the towers' token counts, and its tokens differ by kind."""
    thinker = model["proc"].thinker
    for kind, case in model["cases"].items():
        ids = case["prompt"].input_ids
        audio, image = ids.count(thinker["audio_token_id"]), ids.count(thinker["image_token_id"])
        assert (audio > 0) == ("audio" in kind) and (image > 0) == ("image" in kind)
        assert case["prompt"].kind == kind


def test_rope_positions_match_get_rope_index(model):
    ref = model["ref"]
    for kind, case in model["cases"].items():
        p = case["prompt"]
        ids = torch.tensor([p.input_ids])
        lengths = p.feature_attention_mask.sum(-1) if p.feature_attention_mask is not None else None
        want, delta = ref.model.get_rope_index(ids, p.image_grid_thw, None, torch.ones_like(ids), False, lengths)
        ours, our_delta = rope_positions(p.input_ids, model["proc"].thinker, p.image_grid_thw)
        assert torch.equal(ours, want[:, 0].long()), kind
        assert our_delta == int(delta)
        if "image" in kind:
            assert our_delta < 0  # an image's rows and columns share positions: decode positions move back


@pytest.mark.parametrize("path,capacity", [("careful", "between"), ("graph", "all"), ("pipelined", "between")])
def test_greedy_tokens_and_logits_match_transformers(model, path, capacity):
    """Every decode path after the prompt (positions offset by the rope delta), through an expert cache
    holding all experts or fewer (misses, evictions)."""
    cfg = model["cfg"]
    rt = model["runtime"](capacity=cfg.num_experts if capacity == "all" else cfg.experts_per_token + 2, use_kernels=False)
    for kind, case in model["cases"].items():
        gen = generate(rt, None, NEW_TOKENS, media=case["prompt"], return_logits=True, path=path)
        assert gen.tokens[0] == case["tokens"], kind
        assert max_delta(gen.logits, case["step_logits"]) <= TOL, kind
        assert 0 < gen.towers_seconds < gen.prefill_seconds
    if capacity == "between":
        assert rt.cache.stats()["evictions"] > 0


def test_chunked_prefill_and_teacher_forcing_match_transformers(model, monkeypatch):
    """A prompt prefilled in chunks of 5 tokens (an image's rows and its deepstack features straddle
    chunks), and teacher forcing over prompt + transformers' tokens."""
    monkeypatch.setattr(cache_policy, "PREFILL_CHUNK", 5)
    rt = model["runtime"](use_kernels=False)
    for kind, case in model["cases"].items():
        gen = generate(rt, None, NEW_TOKENS, media=case["prompt"], return_logits=True)
        assert gen.tokens[0] == case["tokens"], kind
        assert max_delta(gen.logits, case["step_logits"]) <= TOL, kind
        forced = teacher_forced_logits(rt, None, case["tokens"], media=case["prompt"])
        assert (forced - case["forced"]).abs().max().item() <= TOL, kind


def test_text_after_media_is_text_again(model):
    """A text prompt after a media prompt on the same runtime reads the plain rope table again."""
    rt = model["runtime"](use_kernels=False)
    case = model["cases"]["text+image"]
    generate(rt, None, 4, media=case["prompt"])
    ids = model["proc"].tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        want = model["ref"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False)[0, ids.shape[1]:].tolist()
    assert generate(rt, ids, 8).tokens[0] == want


def test_positions_and_deepstack_matter(model, monkeypatch):
    """Controls: the image's MRoPE positions and the deepstack features each move the logits well past
    the tolerance, so parity above is not parity by luck."""
    from moe_offload.runtime import towers

    case = model["cases"]["text+image"]
    rt = model["runtime"](use_kernels=False)
    real_encode = towers.Towers.encode

    def without(what):
        def encode(self, prompt, embed):
            out = real_encode(self, prompt, embed)
            if what == "deepstack":
                out.deepstack = [torch.zeros_like(d) for d in out.deepstack]
            else:
                out.rope, out.delta = torch.arange(out.rope.shape[1]).expand(3, -1).clone(), 0
            return out
        return encode

    for what in ("deepstack", "positions"):
        monkeypatch.setattr(towers.Towers, "encode", without(what))
        gen = generate(rt, None, NEW_TOKENS, media=case["prompt"], return_logits=True)
        assert max_delta(gen.logits, case["step_logits"]) > 1e-3, what


@pytest.mark.slow
@pytest.mark.parametrize("model", ["odd"], indirect=True)  # 48 layers under the interpreter would take minutes
def test_fused_kernels_after_media_match_transformers(model):
    """The decode step CUDA runs (the Triton kernels, here under the interpreter: a few tokens) after an
    image prompt, whose decode positions are offset by the rope delta; on the odd-dims checkpoint."""
    case = model["cases"]["text+audio+image"]
    rt = model["runtime"](capacity=model["cfg"].experts_per_token + 2, use_kernels=True)
    assert rt.step.ops is TRITON_OPS
    gen = generate(rt, None, 5, media=case["prompt"], return_logits=True, path="pipelined")
    assert gen.tokens[0] == case["tokens"][:5]
    assert max_delta(gen.logits, case["step_logits"]) <= TOL


def test_bad_media_files_are_one_line_errors(tmp_path):
    write_wav(tmp_path / "fast.wav", tone(0.2, rate=22050), rate=22050)
    write_wav(tmp_path / "stereo.wav", tone(0.2), channels=2)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not a wav")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    write_image(tmp_path / "ok.png", gradient(8, 8))
    (tmp_path / "ok.png").rename(tmp_path / "ok.gif")
    cases = [(check_audio, "fast.wav", "sample rate 22050 Hz"), (check_audio, "stereo.wav", "2 channels"),
             (check_audio, "missing.wav", "does not exist"), (check_audio, "broken.wav", "cannot be read"),
             (check_audio, "tone.mp3", "not a .wav or .flac"), (check_image, "broken.png", "cannot be read"),
             (check_image, "missing.png", "does not exist"), (check_image, "ok.gif", "not a .png or .jpeg")]
    for check, name, words in cases:
        with pytest.raises(InputError, match=words) as err:
            check(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_flac_reads_the_same_samples_as_wav_and_is_checked_the_same_way(tmp_path):
    """A flac prompt (read by soundfile) gives the samples its 16-bit wav twin gives (so the same features
    and tokens); its header is checked as a wav's is."""
    import soundfile

    samples = noise(0.5, seed=3)
    write_wav(tmp_path / "clip.wav", samples)
    pcm = (samples * 32767).astype("int16")  # the wav's own 16-bit values
    soundfile.write(tmp_path / "clip.flac", pcm, 16000, subtype="PCM_16")
    flac, wav = read_audio(tmp_path / "clip.flac"), read_audio(tmp_path / "clip.wav")
    assert flac.dtype == wav.dtype == "float32" and flac.shape == wav.shape == samples.shape
    assert (flac == wav).all()  # both readers scale 16-bit PCM by 1/32768
    assert abs(flac - samples).max() <= 2 / 32768
    soundfile.write(tmp_path / "fast.flac", samples, 22050, subtype="PCM_16")
    soundfile.write(tmp_path / "stereo.flac", samples[:, None].repeat(2, axis=1), 16000, subtype="PCM_16")
    (tmp_path / "broken.flac").write_bytes(b"fLaC but not really")
    for name, words in [("fast.flac", "sample rate 22050 Hz"), ("stereo.flac", "2 channels"),
                        ("broken.flac", "cannot be read")]:
        with pytest.raises(InputError, match=words) as err:
            check_audio(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_tower_params_count_transformers_modules():
    """resources.tower_params (the plan's memory bound) against the modules' own parameter count, at the
    default's tiny dims and at the real thinker's (transformers' config defaults, built on the meta device)."""
    import json

    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeAudioEncoder,
                                                                            Qwen3OmniMoeVisionEncoder)

    from moe_offload.resources import tower_params

    def count(cfg):
        with init_empty_weights():
            modules = (Qwen3OmniMoeAudioEncoder._from_config(cfg.audio_config),
                       Qwen3OmniMoeVisionEncoder._from_config(cfg.vision_config))
        return sum(p.numel() for m in modules for p in m.parameters())

    default = REPO / "models" / "default"
    assert tower_params(json.loads((default / "config.json").read_text())["thinker_config"]) == \
        count(AutoConfig.from_pretrained(default).thinker_config)
    real = Qwen3OmniMoeThinkerConfig()
    assert tower_params(real.to_dict()) == count(real) > 10**9
    assert tower_params(None) == 0
