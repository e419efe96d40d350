"""Checkpoint layouts described as data, and the text-model facts read from config.json.

A layout says where a model family keeps its text decoder's tensors; everything else (extraction,
validation, the runtime) asks the layout for names instead of branching on the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values that select this layout
    text_config_keys: tuple[str, ...]  # path to the text decoder's config inside config.json
    prefix: str  # decoder prefix: embed_tokens, layers.{L}..., norm live under it
    lm_head: str
    component: tuple[str, ...]  # name prefixes of every tensor the text model owns
    native: str  # prefix of what transformers' native text-generation class loads (thinker: + audio, vision)
    native_class: str  # that class, in transformers
    towers: tuple[str, ...] = ()  # name prefixes of the audio and vision towers' tensors (the thinker's)

    def layer(self, layer: int) -> str:
        return f"{self.prefix}layers.{layer}."

    def expert(self, layer: int, expert: int, proj: str) -> str:
        return f"{self.prefix}layers.{layer}.mlp.experts.{expert}.{proj}.weight"

    def expert_prefix(self, layer: int) -> str:
        return f"{self.prefix}layers.{layer}.mlp.experts."

    def router(self, layer: int) -> str:
        return f"{self.prefix}layers.{layer}.mlp.gate.weight"

    def in_component(self, name: str) -> bool:
        return name.startswith(self.component)

    def expert_names(self, layer: int, num_experts: int) -> list[str]:
        """A layer's expert tensors in file order: expert by expert, gate, up, down adjacent."""
        return [self.expert(layer, e, proj) for e in range(num_experts) for proj in PROJECTIONS]

    def dense_names(self, weight_map: dict[str, str]) -> list[str]:
        """Every tensor of the text model that is not an expert, in index order."""
        return [name for name in weight_map if self.in_component(name) and ".mlp.experts." not in name]

    def tower_names(self, weight_map: dict[str, str]) -> list[str]:
        """Every tensor of the audio and vision towers, in index order (none for a text-only layout)."""
        return [name for name in weight_map if self.towers and name.startswith(self.towers)]


LAYOUTS = (
    Layout(
        name="qwen3_omni_thinker",
        model_types=("qwen3_omni_moe",),
        text_config_keys=("thinker_config", "text_config"),
        prefix="thinker.model.",
        lm_head="thinker.lm_head.weight",
        component=("thinker.model.", "thinker.lm_head."),
        native="thinker.",
        native_class="Qwen3OmniMoeThinkerForConditionalGeneration",
        towers=("thinker.audio_tower.", "thinker.visual."),
    ),
    Layout(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        text_config_keys=(),
        prefix="model.",
        lm_head="lm_head.weight",
        component=("model.", "lm_head."),
        native="",
        native_class="Qwen3MoeForCausalLM",
    ),
)


def layout_by_name(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise InputError(f"unknown layout {name!r} (known: {', '.join(l.name for l in LAYOUTS)})")


@dataclass(frozen=True)
class TextConfig:
    """The text decoder's dimensions, whatever the key names of the save that produced them."""

    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    moe_intermediate_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    norm_topk_prob: bool
    mlp_only_layers: tuple[int, ...]
    decoder_sparse_step: int
    tie_word_embeddings: bool

    def has_experts(self, layer: int) -> bool:
        # Same rule as transformers' Qwen3-MoE decoder layer.
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def expert_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.has_experts(layer)]

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        i, h = self.moe_intermediate_size, self.hidden_size
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def expert_bytes(self) -> int:
        """One expert as the checkpoint stores it (bf16)."""
        return self.expert_params * 2

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        """Back from the manifest's `text_config` (JSON turned the tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer} is out of range: the model has layers 0..{self.num_layers - 1}")
        if not self.has_experts(layer):
            raise InputError(f"layer {layer} has no experts (mlp_only_layers / decoder_sparse_step): its MLP is dense")


def _get(cfg: dict, *keys: str, default=None):
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    return default


def text_config_from_dict(cfg: dict) -> TextConfig:
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    return TextConfig(
        num_layers=cfg["num_hidden_layers"],
        # hub saves say num_experts, transformers 5 re-saves say num_local_experts
        num_experts=_get(cfg, "num_experts", "num_local_experts", default=0),
        experts_per_token=cfg["num_experts_per_tok"],
        hidden_size=hidden,
        moe_intermediate_size=cfg["moe_intermediate_size"],
        intermediate_size=cfg["intermediate_size"],
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads),
        head_dim=_get(cfg, "head_dim", default=hidden // heads),
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(_get(rope, "rope_theta", default=_get(cfg, "rope_theta", default=10000.0))),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
        decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


# Far above any real model, low enough that a typo cannot make the planner build a billion jobs.
LIMITS = {"num_layers": 1024, "experts_per_token": 4096, "hidden_size": 65536,
          "moe_intermediate_size": 262144, "intermediate_size": 262144, "num_heads": 1024, "num_kv_heads": 1024,
          "head_dim": 4096, "vocab_size": 10_000_000, "decoder_sparse_step": 1024}


def _check_dims(cfg: TextConfig) -> TextConfig:
    """config.json's dimensions are positive integers within LIMITS and agree with one another."""
    for key, limit in {**LIMITS, "num_experts": 4096}.items():
        value, least = getattr(cfg, key), 0 if key == "num_experts" else 1  # 0 experts: a dense model
        if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= limit:
            raise InputError(f"config.json: {key} is {value!r}, expected an integer from {least} to {limit}")
    if cfg.num_experts and cfg.experts_per_token > cfg.num_experts:
        raise InputError(f"config.json: num_experts_per_tok {cfg.experts_per_token} is more than num_experts "
                         f"{cfg.num_experts}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise InputError(f"config.json: num_attention_heads {cfg.num_heads} is not divisible by num_key_value_heads "
                         f"{cfg.num_kv_heads}")
    if not all(isinstance(layer, int) for layer in cfg.mlp_only_layers):
        raise InputError("config.json: mlp_only_layers must be a list of layer numbers")
    return cfg


def detect(config: dict) -> tuple[Layout, TextConfig]:
    """Pick the layout from config.json's model_type and read the text decoder's config."""
    model_type = config.get("model_type")
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            text = config
            for key in layout.text_config_keys:
                text = text.get(key) or {} if isinstance(text, dict) else {}
            try:
                return layout, _check_dims(text_config_from_dict(text))
            except KeyError as err:
                raise InputError(f"config.json of model_type {model_type!r} lacks text config key {err}") from None
            except (TypeError, ValueError, ZeroDivisionError) as err:
                raise InputError(f"config.json of model_type {model_type!r}: a text config value has the wrong "
                                 f"type ({err})") from None
    known = ", ".join(t for l in LAYOUTS for t in l.model_types)
    raise InputError(f"config.json model_type {model_type!r} is not a supported MoE layout (supported: {known})")


def read_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise InputError(f"checkpoint directory {checkpoint_dir} is a file, not a directory")
    if not Path(checkpoint_dir).is_dir():
        raise InputError(f"checkpoint directory {checkpoint_dir} does not exist")
    if not path.is_file():
        raise InputError(f"{path} does not exist: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object")
    return config


def detect_checkpoint(checkpoint_dir: str | Path) -> tuple[Layout, TextConfig]:
    return detect(read_config(checkpoint_dir))
