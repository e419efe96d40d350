"""Seeded tiny checkpoints in the exact hub layout, built with transformers' own model classes.

The hub is out of reach in tests and CI, so the workflow's default model is one of these: real class,
real tensor names, bf16 storage, shards small enough that layers straddle shard boundaries, and a
byte-level BPE tokenizer trained on a fixed text so prompts are text.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .layouts import layout_by_name
from .processor import add_media_files

# Fixed training text for the tokenizer: deterministic, and covers the default prompts' words.
CORPUS = """\
The mixture of experts model routes every token to a few experts chosen by a router.
Each layer holds many experts; only the experts the router asks for need to be in memory.
A cache keeps recently used experts close, and loads the others from disk on demand.
The capital of France is Paris. The capital of Japan is Tokyo. Water boils at one hundred degrees.
Once upon a time there was a small robot who wanted to learn how to paint the sea.
Explain why the sky is blue in one sentence. Write a short poem about the moon and the stars.
def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9
Snakemake runs each step of a workflow as a job that produces files, so a crash loses little.
"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512


def build_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 16,  # headroom below the model's vocab size
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.save_pretrained(out_dir)


ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}


def text_config(spec: dict) -> dict:
    heads, kv_heads, head_dim = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    return dict(
        vocab_size=spec.get("vocab_size", VOCAB_SIZE),
        hidden_size=spec["hidden_size"],
        intermediate_size=2 * spec["hidden_size"],
        moe_intermediate_size=spec["moe_intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_experts=spec["num_experts"],
        num_experts_per_tok=spec["experts_per_token"],
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=list(spec.get("mlp_only_layers", [])),
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=spec.get("initializer_range", 0.1),
        tie_word_embeddings=False,
    )


def _omni_model(spec: dict):
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    text = text_config(spec)
    head_dim = spec["head_dim"]
    # The real thinker's interleaved MRoPE; sections sum to head_dim / 2.
    half = head_dim // 2
    sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text["rope_parameters"] = {**ROPE, "mrope_section": sections, "mrope_interleaved": True}
    hidden = spec["hidden_size"]
    cfg = Qwen3OmniMoeConfig(
        thinker_config=dict(
            text_config=text,
            initializer_range=text["initializer_range"],
            # The hub config carries this id; transformers' text-only rope-index path reads it.
            vision_start_token_id=151652,
            # tiny towers; spec towers "real": transformers' defaults, the real thinker's (1.2 B parameters)
            audio_config=dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                              output_dim=hidden, num_mel_bins=16, downsample_hidden_size=8)
            if spec.get("towers", "tiny") == "tiny" else dict(output_dim=hidden),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                               deepstack_visual_indexes=[0], num_position_embeddings=16)
            if spec.get("towers", "tiny") == "tiny" else dict(out_hidden_size=hidden),
        ),
        # The talker and code2wav are not used for text, but the real checkpoint has them: keep them
        # (tiny) so the extractor must pick the thinker's tensors out of a mixed checkpoint.
        talker_config=dict(
            text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
                             num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32),
            code_predictor_config=dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_code_groups=2),
            num_code_groups=2, thinker_hidden_size=hidden, spatial_merge_size=2, speaker_id={"ethan": 0},
        ),
        code2wav_config=dict(codebook_size=32, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, num_hidden_layers=1, num_quantizers=2, decoder_dim=32,
                             upsample_rates=[2, 2], upsampling_ratios=[2]),
        enable_audio_output=True,
    )
    return Qwen3OmniMoeForConditionalGeneration(cfg)


def _qwen3_moe_model(spec: dict):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    text = text_config(spec)
    text["rope_parameters"] = dict(ROPE)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**text))


BUILDERS = {"qwen3_omni_thinker": _omni_model, "qwen3_moe": _qwen3_moe_model}


def remove_stale_builds(out_dir: Path) -> None:
    """A killed build leaves its temporary sibling behind; the one job that builds out_dir removes them
    (Snakemake's lock keeps a second run of that job away)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def build_synthetic(out_dir: str | Path, spec: dict) -> Path:
    """Build the checkpoint described by `spec` (see config/config.yaml, model.synthetic) at out_dir.
    Benchmarks may also set `embed_scale` (token embeddings scaled by it, for routing that follows the
    token).

    Written into a temporary sibling and renamed, so out_dir is either complete or absent.
    """
    import torch

    layout = layout_by_name(spec["layout"])
    out_dir = Path(out_dir)
    torch.manual_seed(spec["seed"])
    model = BUILDERS[layout.name](spec)
    with torch.no_grad():
        # Norm weights default to ones; give them seeded values so a norm that a loader silently
        # defaults changes the logits and cannot pass parity.
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
        if spec.get("embed_scale", 1) != 1:
            # token embeddings that outweigh what the layers add: each token's routing follows the token,
            # as a trained model's does, instead of a residual stream that barely changes from token to token
            (embed,) = (param for name, param in model.named_parameters()
                        if name.endswith("embed_tokens.weight") and not name.startswith(("talker", "code2wav")))
            embed.mul_(spec["embed_scale"])
    model = model.to(getattr(torch, spec.get("storage_dtype", "bfloat16")))  # fine-tunes are often f16 or f32
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=spec["max_shard_size"])
        build_tokenizer(tmp)
        if layout.towers:  # the thinker's placeholder tokens and preprocessor config, as the hub's has them
            add_media_files(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

