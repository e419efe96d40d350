"""What each job holds in memory, from the model's dimensions, the device and the dtype, so the workflow
can declare it (Snakemake `mem_mb`) and stop up front when a job cannot fit the machine.

All figures are bytes. They count weights and KV cache at the compute dtype; a process's own overhead
(Python, torch, allocator slack) is the workflow's `resources.base_mem_mb`, added when declaring.
"""

from __future__ import annotations

import os
import subprocess

from .checkpoint.layouts import TextConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MB = 2**20


def dense_params(cfg: TextConfig, depth: int | None = None) -> int:
    """Parameters outside the experts: embeddings, lm_head, final norm, and per layer attention, norms and
    the router (or the dense MLP of a layer without experts), for the first `depth` layers."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = h * q + 2 * h * kv + q * h + 2 * cfg.head_dim + 2 * h  # q, k, v, o, q/k norms, two layer norms
    total = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    for layer in range(cfg.num_layers if depth is None else depth):
        mlp = cfg.num_experts * h if cfg.has_experts(layer) else 3 * h * cfg.intermediate_size
        total += attention + mlp
    return total


def tower_params(thinker: dict | None) -> int:
    """Parameters of a Qwen3-Omni thinker's audio and vision towers, from config.json's thinker_config
    (transformers' Qwen3OmniMoeAudioEncoder and Qwen3OmniMoeVisionEncoder, counted layer by layer; a test
    checks the count against the modules). 0 without towers."""
    if not thinker or "audio_config" not in thinker or "vision_config" not in thinker:
        return 0
    a, v = thinker["audio_config"], thinker["vision_config"]
    d, ffn, ds, mel = a["d_model"], a["encoder_ffn_dim"], a["downsample_hidden_size"], a["num_mel_bins"]
    freq = (((mel + 1) // 2 + 1) // 2 + 1) // 2  # mel bins left after three stride-2 convolutions
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * ffn + ffn) + (ffn * d + d)  # attention, two norms, MLP
    audio = (a["encoder_layers"] * layer + 2 * d + (9 * ds + ds) + 2 * (9 * ds * ds + ds) + ds * freq * d
             + (d * d + d) + (d * a["output_dim"] + a["output_dim"]))
    h, inter, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    merged = h * v["spatial_merge_size"] ** 2
    block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)

    def merger(post_norm: bool) -> int:
        return 2 * (merged if post_norm else h) + (merged * merged + merged) + (merged * out + out)

    patch = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2 * h + h
    vision = (patch + v["num_position_embeddings"] * h + v["depth"] * block + merger(False)
              + len(v.get("deepstack_visual_indexes") or []) * merger(True))
    return audio + vision


def expert_layers(cfg: TextConfig, depth: int | None = None) -> list[int]:
    return [layer for layer in cfg.expert_layers if depth is None or layer < depth]


def dtype_size(dtype) -> int:
    """Bytes of one element of `dtype`, a name ("bfloat16") or a torch dtype (this module imports no torch:
    the workflow plans with it)."""
    return DTYPE_BYTES[str(dtype).removeprefix("torch.")]


def model_bytes(cfg: TextConfig, dtype: str) -> int:
    """The whole text model's weights at `dtype` (what transformers' native model holds)."""
    experts = len(cfg.expert_layers) * cfg.num_experts * cfg.expert_params
    return (dense_params(cfg) + experts) * dtype_size(dtype)


def kv_bytes(cfg: TextConfig, layers: int, seq_len: int, dtype) -> int:
    return 2 * layers * cfg.num_kv_heads * seq_len * cfg.head_dim * dtype_size(dtype)


def active_params(cfg: TextConfig, depth: int) -> int:
    """Parameters one prompt token is multiplied by at `depth` layers: attention's projections, the router,
    the top-k experts (or the dense MLP). Norms do no matmul, the embedding is a lookup and lm_head runs
    once per prompt, so prefill's work grows with these alone."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attention = h * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    params = 0
    for layer in range(depth):
        if cfg.has_experts(layer):
            params += attention + cfg.num_experts * h + cfg.experts_per_token * cfg.expert_params
        else:
            params += attention + 3 * h * cfg.intermediate_size
    return params


def bytes_read_per_token(cfg: TextConfig, depth: int, dtype, expert_bytes: float | None = None) -> int:
    """Weights one decoded token must read at `depth` layers, at `dtype`: attention, norms and routers of
    each layer, top-k experts (or the dense MLP) per layer, the final norm, lm_head and one embedding row.
    expert_bytes: one expert as the cache holds it (quantized: its qweights and scales), if not its
    parameters in dtype. The KV it attends over comes on top (kv_bytes). Every decode bound divides a read
    rate by this."""
    h, hd = cfg.hidden_size, cfg.head_dim
    norms = depth * (2 * hd + 2 * h) + h
    total = (active_params(cfg, depth) + norms + cfg.vocab_size * h + h) * dtype_size(dtype)
    if expert_bytes is not None:
        routed = cfg.experts_per_token * sum(cfg.has_experts(layer) for layer in range(depth))
        total += routed * (expert_bytes - cfg.expert_params * dtype_size(dtype))
    return int(total)


def cache_slots(cfg: TextConfig, depth: int, capacity: int | None, scope: str) -> int:
    """Experts the cache preallocates (ExpertCache's slabs): capacity per layer, or one pool."""
    layers = expert_layers(cfg, depth)
    every = len(layers) * cfg.num_experts
    if capacity is None:
        return every
    return min(capacity, cfg.num_experts) * len(layers) if scope == "per_layer" else min(capacity, every)


def quantized_expert_bytes(cfg: TextConfig, bits: int, group_size: int, dtype="bfloat16") -> int:
    """One expert as a slot holds it: its parameters at `dtype` (bits 16), or quantized (checkpoint.quantize):
    bits / 8 bytes a weight and a float16 scale per group of group_size weights."""
    if bits == 16:
        return cfg.expert_params * dtype_size(dtype)
    return cfg.expert_params * bits // 8 + cfg.expert_params // group_size * 2


def depth_bytes(cfg: TextConfig, depth: int, capacity: int | None, scope: str, dtype: str, seq_len: int,
                pinned_staging: bool = False, unified: bool = False, expert_bytes: int | None = None) -> dict:
    """A selective run through `depth` layers: dense + capacity x expert + KV, plus (CUDA, pin_memory) the
    host's pinned staging buffers, one expert per routed slot of a step. unified: every expert is held.
    expert_bytes: one expert as stored and held (quantized_expert_bytes), if not its parameters at dtype."""
    size = dtype_size(dtype)
    held = cfg.expert_params * size if expert_bytes is None else expert_bytes
    stored = cfg.expert_bytes if expert_bytes is None else expert_bytes
    slots = cache_slots(cfg, depth, None if unified else capacity, "per_layer" if unified else scope)
    parts = {"dense_bytes": dense_params(cfg, depth) * size,
             "expert_cache_bytes": slots * held,
             "kv_cache_bytes": kv_bytes(cfg, depth, seq_len, dtype),
             "host_staging_bytes": (cfg.experts_per_token * len(expert_layers(cfg, depth)) * stored
                                    if pinned_staging else 0)}
    return {**parts, "total_bytes": sum(parts.values())}


def native_bytes(cfg: TextConfig, dtype: str, seq_len: int, budget_bytes: int | None = None,
                 towers_bytes: int = 0) -> dict:
    """transformers' native model: every weight at `dtype` (a thinker's towers included: towers_bytes)
    plus KV; with a budget (accelerate's max_memory), only what fits in it is held, the rest offloaded to
    disk."""
    weights = model_bytes(cfg, dtype) + towers_bytes
    held = weights if budget_bytes is None else min(weights, budget_bytes)
    kv = kv_bytes(cfg, cfg.num_layers, seq_len, dtype)
    return {"weights_bytes": weights, "held_bytes": held, "offloaded_bytes": weights - held,
            "kv_cache_bytes": kv, "total_bytes": held + kv}


def extract_bytes(cfg: TextConfig) -> dict:
    """What extraction writes: every expert layer's file and the dense file (bf16, as stored)."""
    layer = cfg.num_experts * cfg.expert_bytes
    dense = dense_params(cfg) * 2
    return {"layer_bytes": layer, "layers_bytes": layer * len(cfg.expert_layers), "dense_bytes": dense,
            "total_bytes": layer * len(cfg.expert_layers) + dense}


def to_mb(nbytes: int, base_mb: int = 0) -> int:
    """Bytes as a Snakemake mem_mb figure (MiB, rounded up) plus a process's base overhead."""
    return -(-nbytes // MB) + base_mb


def fits_line(job: str, need_mb: int, have_mb: int, hint: str = "", what: str = "memory",
              holder: str = "the machine") -> str | None:
    """None when `need_mb` fits in `have_mb`; else the one line saying so."""
    if need_mb <= have_mb:
        return None
    line = f"error: {job} needs {_size(need_mb)} of {what}, {holder} has {_size(have_mb)}"
    return f"{line}: {hint}" if hint else line


def _size(mb: int) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb} MiB"


def gpu_memory_mb(device: str, smi: str = "nvidia-smi") -> int | None:
    """Total memory (MiB) of the GPU that `device` ("cuda" or "cuda:N") names, as nvidia-smi reports it;
    None where it sees none or gives no figure (no driver, no GPU, or memory it does not report). Asked of
    nvidia-smi, not torch: the planning process must not initialise CUDA. CUDA_VISIBLE_DEVICES, when it
    lists indices, says which GPUs cuda:0, cuda:1, ... are."""
    try:
        proc = subprocess.run([smi, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    total = {}
    for line in proc.stdout.splitlines():
        index, _, mb = (part.strip() for part in line.partition(","))
        if index.isdigit():
            total[int(index)] = int(mb) if mb.isdigit() else None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = sorted(total)
    if visible is not None and all(part.strip().isdigit() for part in visible.split(",") if part.strip()):
        order = [int(part) for part in visible.split(",") if part.strip() and int(part) in total]
    number = int(device.partition(":")[2] or 0)
    return total[order[number]] if number < len(order) else None
