"""A prompt's audio and images (read and checked by media_files) prepared by the checkpoint's own feature
extractor (WhisperFeatureExtractor) and image processor (Qwen2-VL's), placeholders expanded in its token
ids, and the thinker's multimodal RoPE positions.

Qwen3OmniMoeProcessor would do the same expansion but will not build without its video processor (which
needs torchvision); the steps here are its replace_audio_token / replace_image_token, and its audio
token count (_get_feat_extract_output_lengths).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.layouts import read_config
from ..checkpoint.processor import MEDIA_TOKENS, SAMPLING_RATE
from ..errors import InputError
from ..media_files import read_audio, read_image

@dataclass
class MediaPrompt:
    """One prompt as the thinker takes it: token ids with each placeholder expanded, and what the feature
    extractor and the image processor made of its audio and images (transformers' argument names)."""

    input_ids: list[int]
    input_features: torch.Tensor | None = None  # [audios, mel bins, frames]
    feature_attention_mask: torch.Tensor | None = None  # [audios, frames]
    pixel_values: torch.Tensor | None = None  # [patches, C * T * P * P]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]

    @property
    def kind(self) -> str:
        return "+".join(["text"] + ["audio"] * (self.input_features is not None)
                        + ["image"] * (self.image_grid_thw is not None))

    def native_kwargs(self) -> dict:
        """The keyword arguments transformers' thinker takes for this prompt."""
        kw = dict(input_features=self.input_features, feature_attention_mask=self.feature_attention_mask,
                  pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return {k: v for k, v in kw.items() if v is not None}


def audio_tokens(frames: torch.Tensor, n_window: int) -> torch.Tensor:
    """Tokens the audio tower makes of `frames` mel frames (transformers' _get_feat_extract_output_lengths)."""
    chunk = n_window * 2
    rest = (frames % chunk - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13


class MediaProcessor:
    """The checkpoint's tokenizer, feature extractor and image processor, and the thinker's config."""

    def __init__(self, checkpoint_dir: str | Path, tokenizer=None):
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

        ckpt = Path(checkpoint_dir)
        if not (ckpt / "preprocessor_config.json").is_file():
            raise InputError(f"{ckpt} has no preprocessor_config.json: the checkpoint cannot take audio or images")
        self.thinker = read_config(ckpt).get("thinker_config") or {}
        if "audio_config" not in self.thinker or "vision_config" not in self.thinker:
            raise InputError(f"{ckpt}/config.json has no audio and vision towers (thinker_config)")
        self.tok = tokenizer or AutoTokenizer.from_pretrained(ckpt)
        self.features = AutoFeatureExtractor.from_pretrained(ckpt)
        self.images = AutoImageProcessor.from_pretrained(ckpt)
        self.token = {attr: getattr(self.tok, attr, None) or text for attr, text in MEDIA_TOKENS.items()}
        for key, attr in (("audio_token_id", "audio_token"), ("image_token_id", "image_token"),
                          ("audio_start_token_id", "audio_bos_token"), ("vision_start_token_id", "vision_bos_token")):
            tid = self.tok.convert_tokens_to_ids(self.token[attr])
            if tid != self.thinker.get(key):
                raise InputError(f"{ckpt}: the tokenizer's {self.token[attr]} is id {tid}, config.json's {key} is "
                                 f"{self.thinker.get(key)}")

    def inputs(self, audio: list = (), images: list = ()) -> tuple[MediaPrompt, list[int], list[int]]:
        """What the feature extractor and the image processor make of the files (no token ids yet), and the
        number of tokens each audio clip and each image takes."""
        out, audio_counts, image_counts = MediaPrompt(input_ids=[]), [], []
        if audio:
            a = self.features([read_audio(p) for p in audio], sampling_rate=SAMPLING_RATE, padding=True,
                              truncation=False, return_attention_mask=True, return_tensors="pt")
            out.input_features, out.feature_attention_mask = a["input_features"], a["attention_mask"]
            n_window = self.thinker["audio_config"].get("n_window", 50)
            audio_counts = audio_tokens(a["attention_mask"].sum(-1), n_window).tolist()
        if images:
            v = self.images(images=[read_image(p) for p in images], return_tensors="pt")
            out.pixel_values, out.image_grid_thw = v["pixel_values"], v["image_grid_thw"]
            merge = self.thinker["vision_config"]["spatial_merge_size"]
            image_counts = (v["image_grid_thw"].prod(-1) // merge ** 2).tolist()
        return out, audio_counts, image_counts

    def __call__(self, text: str, audio: list = (), images: list = (), chat_template: bool | None = None) -> MediaPrompt:
        """The prompt's audio, then its images, then its text, as one user turn (the chat template's
        content parts when the tokenizer has one and chat_template is not false)."""
        out, audio_counts, image_counts = self.inputs(audio, images)
        t = self.token
        has_template = bool(getattr(self.tok, "chat_template", None))
        if chat_template and not has_template:
            raise InputError("generate.chat_template is true but the checkpoint's tokenizer has no chat template")
        if has_template and chat_template is not False:  # the template writes each item's markers
            parts = [{"type": "audio"}] * len(audio) + [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
            rendered = self.tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                    tokenize=False)
        else:
            rendered = (t["audio_bos_token"] + t["audio_token"] + t["audio_eos_token"]) * len(audio) + (
                t["vision_bos_token"] + t["image_token"] + t["vision_eos_token"]) * len(images) + text
        rendered = expand(rendered, t["audio_token"], audio_counts)
        out.input_ids = self.tok(expand(rendered, t["image_token"], image_counts))["input_ids"]
        return out


def expand(text: str, token: str, counts: list[int]) -> str:
    """The k-th `token` in text repeated counts[k] times (the processor's placeholder expansion)."""
    parts = text.split(token)
    if len(parts) - 1 != len(counts):
        raise InputError(f"the prompt holds {len(parts) - 1} {token} for {len(counts)} inputs (its text may not "
                         f"contain {token} itself)")
    return parts[0] + "".join(token * n + rest for n, rest in zip(counts, parts[1:]))


def rope_positions(input_ids: list[int], thinker: dict, image_grid_thw: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The thinker's three position streams [3, T] and the rope delta (max position + 1 - T) that decode
    positions are offset by, as transformers' get_rope_index gives them for text, audio and images: text
    and audio count up on all three; an image's tokens sit at (t, row, column) from the position after its
    <|vision_start|>, and what follows continues from the largest of them + 1."""
    image_id, start_id = thinker["image_token_id"], thinker["vision_start_token_id"]
    merge = thinker["vision_config"]["spatial_merge_size"]
    pos = torch.zeros(3, len(input_ids), dtype=torch.long)
    nxt, i, image = 0, 0, 0
    while i < len(input_ids):
        if input_ids[i] == start_id and i + 1 < len(input_ids) and input_ids[i + 1] == image_id:
            pos[:, i] = nxt
            _, h, w = (int(x) for x in image_grid_thw[image])
            h, w = h // merge, w // merge
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            span = slice(i + 1, i + 1 + h * w)
            pos[0, span], pos[1, span], pos[2, span] = nxt + 1, nxt + 1 + rows, nxt + 1 + cols
            nxt = int(pos[:, span].max()) + 1
            i, image = i + 1 + h * w, image + 1
            continue
        pos[:, i] = nxt
        nxt, i = nxt + 1, i + 1
    return pos, nxt - len(input_ids)
