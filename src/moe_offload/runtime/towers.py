"""The thinker's audio and vision towers: transformers' own modules (Qwen3OmniMoeAudioEncoder,
Qwen3OmniMoeVisionEncoder) built from the towers file, run once per prompt outside the expert cache; and
their outputs merged into the prompt's embeddings as transformers' thinker merges them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..checkpoint.layouts import read_config
from ..errors import InputError
from .media import MediaPrompt, rope_positions

TOWERS = {"audio": "thinker.audio_tower.", "vision": "thinker.visual."}  # tower -> its checkpoint prefix


@dataclass
class Encoded:
    """A prompt ready for the language model: embeddings with the towers' output at the placeholders, the
    three MRoPE position streams and the decode offset, and the vision tower's deepstack features (one per
    layer they are added after, at visual_rows)."""

    embeds: torch.Tensor  # [1, T, H]
    rope: torch.Tensor  # [3, T]
    delta: int
    visual_rows: torch.Tensor | None = None  # [n] prompt positions of image tokens
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per layer [n, H]

    def chunk(self, first: int, end: int):
        """(embeds, deepstack) of prompt positions first..end-1; deepstack as (rows in the chunk, [features])."""
        embeds = self.embeds[:, first:end]
        if self.visual_rows is None:
            return embeds, None
        inside = (self.visual_rows >= first) & (self.visual_rows < end)
        if not bool(inside.any()):
            return embeds, None
        return embeds, (self.visual_rows[inside] - first, [d[inside] for d in self.deepstack])


class Towers:
    def __init__(self, towers_path: str | Path, checkpoint_dir: str | Path, device, dtype: torch.dtype):
        from accelerate import init_empty_weights
        from transformers import AutoConfig
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeVisionEncoder)

        path = Path(towers_path)
        if not path.is_file():
            raise InputError(f"towers file {path} does not exist")
        self.thinker = read_config(checkpoint_dir)["thinker_config"]
        rope = self.thinker["text_config"].get("rope_parameters") or self.thinker["text_config"].get("rope_scaling") or {}
        self.sections = list(rope.get("mrope_section") or [])
        if len(self.sections) != 3 or not rope.get("mrope_interleaved", True):
            raise InputError(f"{checkpoint_dir}/config.json: the thinker's rope is not interleaved MRoPE with three "
                             f"sections ({rope})")
        config = AutoConfig.from_pretrained(checkpoint_dir).thinker_config
        weights = {name: {} for name in TOWERS}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tower = next((t for t, prefix in TOWERS.items() if key.startswith(prefix)), None)
                if tower is None:
                    raise InputError(f"{path}: tensor {key} belongs to no tower")
                weights[tower][key[len(TOWERS[tower]):]] = f.get_tensor(key).to(dtype)
        self.bytes = sum(t.numel() * t.element_size() for w in weights.values() for t in w.values())
        self.device, self.dtype = torch.device(device), dtype
        self.audio = self.visual = None
        for tower, cls, cfg in (("audio", Qwen3OmniMoeAudioEncoder, config.audio_config),
                                ("vision", Qwen3OmniMoeVisionEncoder, config.vision_config)):
            if not weights[tower]:
                continue
            with init_empty_weights():  # parameters come from the file; buffers made as transformers makes them
                module = cls._from_config(cfg, dtype=dtype)
            try:
                module.load_state_dict(weights[tower], strict=True, assign=True)
            except RuntimeError as err:
                raise InputError(f"{path}: the {tower} tower's tensors do not fit its config "
                                 f"({str(err).splitlines()[0]})") from None
            setattr(self, "audio" if tower == "audio" else "visual", module.to(self.device).eval())

    @torch.inference_mode()
    def encode(self, prompt: MediaPrompt, embed: torch.Tensor) -> Encoded:
        """The prompt's embeddings (embed: the language model's table) with each tower's output scattered
        over its placeholders, as Qwen3OmniMoeThinkerModel.forward does."""
        ids = torch.tensor(prompt.input_ids, dtype=torch.long, device=embed.device)
        x = F.embedding(ids, embed)
        out = Encoded(embeds=x, rope=None, delta=0)
        if prompt.input_features is not None:
            if self.audio is None:
                raise InputError("the prompt has audio but the towers file has no audio tower")
            mask = prompt.feature_attention_mask.bool()
            features = prompt.input_features.permute(0, 2, 1)[mask].permute(1, 0)  # every clip's frames, in order
            audio = self.audio(features.to(self.device), feature_lens=mask.sum(1).to(self.device)).last_hidden_state
            self._scatter(x, ids == self.thinker["audio_token_id"], audio, "audio")
        if prompt.pixel_values is not None:
            if self.visual is None:
                raise InputError("the prompt has images but the towers file has no vision tower")
            vision = self.visual(prompt.pixel_values.to(self.device, self.dtype),
                                 grid_thw=prompt.image_grid_thw.to(self.device))
            rows = (ids == self.thinker["image_token_id"]).nonzero().view(-1)
            self._scatter(x, ids == self.thinker["image_token_id"], vision.pooler_output, "image")
            out.visual_rows, out.deepstack = rows, [d.to(x.dtype) for d in vision.deepstack_features]
        out.embeds = x[None]
        rope, out.delta = rope_positions(prompt.input_ids, self.thinker, prompt.image_grid_thw)
        out.rope = rope.to(self.device)
        return out

    @staticmethod
    def _scatter(x: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, what: str) -> None:
        if int(mask.sum()) != features.shape[0]:
            raise InputError(f"{int(mask.sum())} {what} placeholders for {features.shape[0]} {what} features")
        x[mask] = features.to(x.dtype)
