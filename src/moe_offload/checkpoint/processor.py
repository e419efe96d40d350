"""The multimodal files a tiny Qwen3-Omni checkpoint needs beside its weights: the placeholder tokens in
its tokenizer, their ids in config.json, and a preprocessor_config.json for transformers' own feature
extractor (WhisperFeatureExtractor) and image processor (Qwen2-VL's), at the towers' small dims.

The hub's checkpoint has all of these; the synthetic builds and the embedded default get them here. A
tokenizer trained to the model's full vocabulary has no free id, so the placeholders take the ids of
byte-level tokens that no UTF-8 text can produce (bytes C0, C1, F5-FF): text never maps to them, and
their embedding rows were never trained, so nothing the model learned is given up.
"""

from __future__ import annotations

import json
from pathlib import Path

# the processor's attribute -> the token, as the hub's tokenizer_config names them
MEDIA_TOKENS = {"audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
                "audio_token": "<|audio_pad|>", "vision_bos_token": "<|vision_start|>",
                "vision_eos_token": "<|vision_end|>", "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
# thinker_config id -> the token it names
CONFIG_IDS = {"audio_start_token_id": "audio_bos_token", "audio_token_id": "audio_token",
              "image_token_id": "image_token", "video_token_id": "video_token",
              "vision_start_token_id": "vision_bos_token"}
NEVER_UTF8 = [0xC0, 0xC1, *range(0xF5, 0x100)]  # bytes no valid UTF-8 text contains
SAMPLING_RATE = 16000  # Qwen3-Omni's feature extractor: 16 kHz, 10 ms hops


def byte_level_char(byte: int) -> str:
    """GPT-2's byte-to-unicode map (byte-level BPE vocabularies spell byte b as this character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def alias_media_tokens(tokenizer_json: dict) -> dict[str, int]:
    """Rename byte tokens no text produces to the media tokens, in place; returns token -> id."""
    vocab, ids = tokenizer_json["model"]["vocab"], {}
    for token, byte in zip(MEDIA_TOKENS.values(), NEVER_UTF8):
        char = byte_level_char(byte)
        ids[token] = vocab.pop(char)
        vocab[token] = ids[token]
        tokenizer_json["added_tokens"].append({"id": ids[token], "content": token, "single_word": False,
                                               "lstrip": False, "rstrip": False, "normalized": False,
                                               "special": True})
    return ids


def preprocessor_config(thinker: dict) -> dict:
    """One preprocessor_config.json for both, as the hub's Qwen3-Omni has it (each class reads its keys)."""
    audio, vision = thinker["audio_config"], thinker["vision_config"]
    factor = vision["patch_size"] * vision["spatial_merge_size"]
    return {
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": audio["num_mel_bins"],
        "sampling_rate": SAMPLING_RATE, "hop_length": 160, "n_fft": 400, "chunk_length": 300,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0,
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": vision["patch_size"],
        "temporal_patch_size": vision["temporal_patch_size"], "merge_size": vision["spatial_merge_size"],
        # small images stay small: at most 16 x 16 merged tokens
        "min_pixels": factor * factor, "max_pixels": (16 * factor) ** 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "do_normalize": True,
        "do_resize": True, "do_convert_rgb": True, "processor_class": "Qwen3OmniMoeProcessor",
    }


def add_media_files(checkpoint_dir: str | Path) -> None:
    """Give a Qwen3-Omni checkpoint directory its media tokens, their ids and its preprocessor config (in
    place; run once on a fresh build)."""
    ckpt = Path(checkpoint_dir)
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    ids = alias_media_tokens(tokenizer)
    (ckpt / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False))
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok_cfg["extra_special_tokens"] = dict(MEDIA_TOKENS)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    config = json.loads((ckpt / "config.json").read_text())
    thinker = config["thinker_config"]
    for key, attr in CONFIG_IDS.items():
        thinker[key] = ids[MEDIA_TOKENS[attr]]
    (ckpt / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (ckpt / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(thinker), indent=2) + "\n")
