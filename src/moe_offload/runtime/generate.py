"""Generation with selective expert loading: load a runtime, prefill, decode token by token.

The decoding loop is `generate` below, top to bottom; teacher forcing and the fidelity numbers that
compare our logits with transformers' live here too.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.layouts import Layout, TextConfig, detect_checkpoint
from ..errors import InputError
from . import cache_policy, kernels, prefill_kernels
from .decode import check_path, default_path, make_decoder
from .expert_cache import COUNTERS, CacheOptions, ExpertCache
from .fused_step import TORCH_OPS, TRITON_OPS, FusedStep
from .media import MediaPrompt
from .model import Transformer, load_dense
from .sampler import Sampler
from .towers import Encoded, Towers
from .trace import TRACE_COLUMNS


@dataclass
class Runtime:
    model: Transformer
    cache: ExpertCache
    layout: Layout
    config: TextConfig
    device: torch.device
    dtype: torch.dtype
    dense_bytes: int  # the dense weights held, in the compute dtype (experts are the cache's)
    step: FusedStep  # one decoded token, through the kernels or their PyTorch equivalents
    sampler: Sampler  # picks tokens on the device; each call of generate sets its values
    decoders: dict = field(default_factory=dict)  # decode path -> its strategy, kept across calls (graphs)
    towers: Towers | None = None  # the audio and vision towers, when the run has media prompts

    def decoder(self, path: str):
        if path not in self.decoders:
            self.decoders[path] = make_decoder(self.step, path, self.sampler)
        return self.decoders[path]


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per batch row (eos included; rows that stopped early are shorter)
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float  # decode steps only (the first new token comes from the prefill); 0 if none
    prefill_stats: dict  # expert cache counters during the prefill
    decode_stats: dict  # ... and during the decode steps
    trace: list[dict] = field(default_factory=list)  # router rows of this call
    logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per step, when return_logits
    towers_seconds: float = 0.0  # of prefill_seconds: the towers' encoding and the merge
    prompt_tokens: int = 0  # placeholders expanded


def load_runtime(dense_path: str | Path, layer_files: dict[int, str | Path] | str | Path, checkpoint_dir: str | Path,
                 depth: int | None = None, capacity: int | None = None, scope: str = "per_layer", policy: str = "lru",
                 device: str = "cpu", dtype: torch.dtype | str | None = None, pin_memory: bool = False,
                 side_stream: bool = False, use_kernels: bool | None = None, host_tier: bool = False,
                 unified: bool = False, prefetch: bool = False, in_place_misses: bool | None = None,
                 towers_path: str | Path | None = None) -> Runtime:
    """layer_files: {layer: path}, or a directory holding layer_{L}.safetensors. capacity None = every expert.
    dtype None = float32 on CPU, bfloat16 on CUDA. use_kernels: decode through the fused Triton kernels
    (None: on CUDA when Triton is installed). host_tier: every expert of the run in (pinned) RAM, read once.
    unified: every expert in pinned RAM, read in place by the GPU's kernels (unified-memory machines).
    prefetch: with the host tier, each careful step's MoE layer loads the experts the next layer's router
    predicts from its input, on a side stream, while the GPU computes (router lookahead). in_place_misses:
    with the host tier, decode steps read absent experts from it in place (None: whenever the cache can;
    see ExpertCache). towers_path: the towers file, for prompts with audio or images."""
    layout, cfg = detect_checkpoint(checkpoint_dir)
    depth = cfg.num_layers if depth is None else depth
    if not 1 <= depth <= cfg.num_layers:
        raise InputError(f"depth {depth} is out of range: the model has {cfg.num_layers} layers")
    device = torch.device(device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InputError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16)")
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    needed = [L for L in cfg.expert_layers if L < depth]
    if not isinstance(layer_files, dict):
        layer_files = {L: Path(layer_files) / f"layer_{L}.safetensors" for L in needed}
    missing = [L for L in needed if L not in layer_files]
    if missing:
        raise InputError(f"no expert file given for layer(s) {missing}")
    options = CacheOptions(capacity=capacity, scope=scope, policy=policy, pin_memory=pin_memory, side_stream=side_stream,
                           host_tier=host_tier, unified=unified, prefetch=prefetch, in_place_misses=in_place_misses)
    cache = ExpertCache({L: layer_files[L] for L in needed}, layout, options, device, dtype, cfg.experts_per_token)
    dense = load_dense(dense_path, layout, depth, device, dtype)
    use_kernels = _use_kernels(use_kernels, device, kernels.unserved(cfg.hidden_size, cfg.head_dim,
                                                                      cfg.moe_intermediate_size))
    model = Transformer(cfg, layout, dense, cache, depth, fused=use_kernels and prefill_kernels.serves(device))
    if unified and device.type == "cuda" and not use_kernels:
        raise InputError("unified memory needs the fused kernels (Triton) to read experts in place: "
                         "set cache.fused_kernels to null or true")
    # one-token steps read misses from the host tier in place, the cache's policy on the device
    step = FusedStep(model, TRITON_OPS if use_kernels else TORCH_OPS, in_place=use_kernels and cache.device_lru is not None)
    towers = None if towers_path is None else Towers(towers_path, checkpoint_dir, device, dtype)
    return Runtime(model, cache, layout, cfg, device, dtype, sum(t.numel() * t.element_size() for t in dense.values()),
                   step, Sampler(device), towers=towers)


def _use_kernels(asked: bool | None, device: torch.device, unserved: str | None) -> bool:
    """The fused Triton kernels: when asked, or (None) on CUDA when Triton is there and they serve the
    checkpoint (else one line says why, and decoding runs through PyTorch). Under Triton's interpreter on
    the CPU only when asked for (tests): it is slow."""
    if asked and not kernels.available(device):
        raise InputError(f"the fused kernels need Triton and a CUDA device (or TRITON_INTERPRET=1), not {device}")
    if asked and unserved:
        raise InputError(f"the fused kernels cannot serve this checkpoint: {unserved}")
    if asked is None and unserved and kernels.on_gpu(device):
        print(f"fused kernels off: {unserved}; decoding through PyTorch", file=sys.stderr)
        return False
    return kernels.on_gpu(device) if asked is None else asked


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _delta(after: dict, before: dict) -> dict:
    d = {k: after[k] - before[k] for k in COUNTERS}
    d["hit_rate"] = d["hits"] / (d["hits"] + d["misses"]) if d["hits"] + d["misses"] else 0.0
    return d


def _as_batch(ids, device) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be a non-empty [T] or [B, T] sequence, got shape {tuple(ids.shape)}")
    return ids


@torch.inference_mode()
def generate(runtime: Runtime, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_token_id: int | list[int] | None = None,
             prompt=0, return_logits: bool = False, path: str | None = None,
             media: MediaPrompt | None = None) -> Generation:
    """Greedy (temperature 0) or sampled generation (temperature, top-k, top-p; the same tokens for the
    same seed on every decode path). `prompt` labels the trace rows (an id, or one per row). path: how each
    decode step runs (decode.PATHS; None: the device's default). media: a prompt with audio or images
    (input_ids is then media.input_ids): the towers run inside the timed prefill, once."""
    model, device = runtime.model, runtime.device
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if media is not None:
        input_ids = media.input_ids
    ids = _as_batch(input_ids, device)
    b, t = ids.shape
    path = default_path(runtime.step, b) if path is None else path
    check_path(runtime.step, path, b)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    runtime.sampler.update(temperature, top_k, top_p, 0 if seed is None else seed)
    model.setup_caches(b, t + max_new_tokens)
    model.kv.set_rope()  # text positions, unless the prompt's own replace them below
    trace, logits_out = model.trace, []
    trace_start = len(trace.rows)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b

    # Prefill: the prompt, whose last position gives the first new token.
    trace.prompt, trace.step = prompt, 0
    s0 = runtime.cache.stats()
    _sync(device)
    start = time.perf_counter()
    encoded = encode(runtime, media)
    _sync(device)
    towers_seconds = time.perf_counter() - start if media is not None else 0.0
    logits = prefill(model, ids, t - 1, encoded)[:, -1]
    tok = runtime.sampler(logits, torch.full((1,), t - 1, device=device))
    _sync(device)
    prefill_seconds = time.perf_counter() - start
    s1 = runtime.cache.stats()

    # Decode: one token per step, until max_new_tokens or every row has produced an eos.
    decoder = runtime.decoder(path)
    start, step, tokens = time.perf_counter(), 0, tok.tolist()
    while True:
        if return_logits:
            logits_out.append(logits.float().cpu())
        for row, token in enumerate(tokens):
            if not done[row]:
                out[row].append(token)
                done[row] = token in eos
        step += 1
        if step >= max_new_tokens or all(done):
            break
        trace.step = step
        logits, tok, tokens = decoder.step(tok, t + step - 1, last=step + 1 >= max_new_tokens)
    decoder.flush()  # the last step's hits: counted inside the timed span, as every other step's
    _sync(device)
    decode_seconds = time.perf_counter() - start
    decode_tokens = step - 1
    return Generation(
        tokens=out, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        decode_tokens_per_second=decode_tokens / decode_seconds if decode_tokens and decode_seconds > 0 else 0.0,
        prefill_stats=_delta(s1, s0), decode_stats=_delta(runtime.cache.stats(), s1),
        trace=[dict(zip(TRACE_COLUMNS, row)) for row in trace.rows[trace_start:]], logits=logits_out,
        towers_seconds=towers_seconds, prompt_tokens=t)


def encode(runtime: Runtime, media: MediaPrompt | None) -> Encoded | None:
    """A media prompt through the towers, its MRoPE positions written into the KV cache's rope tables
    (after setup_caches: the tables must be the ones this call's steps read)."""
    if media is None:
        return None
    if runtime.towers is None:
        raise InputError("a prompt with audio or images needs the towers file (load_runtime(towers_path=...))")
    encoded = runtime.towers.encode(media, runtime.model.embed)
    runtime.model.kv.set_rope(encoded.rope, encoded.delta, runtime.towers.sections)
    return encoded


@torch.inference_mode()
def teacher_forced_logits(runtime: Runtime, prompt_ids, continuation_ids, prompt=0,
                          media: MediaPrompt | None = None) -> torch.Tensor:
    """Logits [n, V] (float32, CPU) that predict each continuation token, from one forward over
    prompt + continuation (media: the prompt's audio and images; prompt_ids are then media.input_ids)."""
    prompt_ids, cont = list(media.input_ids if media is not None else prompt_ids), list(continuation_ids)
    if not prompt_ids or not cont:
        raise InputError("teacher forcing needs a non-empty prompt and continuation")
    ids = _as_batch(prompt_ids + cont, runtime.device)
    runtime.model.setup_caches(1, ids.shape[1])
    runtime.model.kv.set_rope()
    runtime.model.trace.prompt, runtime.model.trace.step = prompt, 0
    encoded = encode(runtime, media)
    if encoded is not None:  # the continuation's embeddings after the prompt's; its positions are slot + delta
        encoded.embeds = torch.cat([encoded.embeds, torch.nn.functional.embedding(ids[:, len(prompt_ids):],
                                                                                  runtime.model.embed)], dim=1)
    return prefill(runtime.model, ids, len(prompt_ids) - 1, encoded)[0, :-1].float().cpu()


def prefill(model: Transformer, ids: torch.Tensor, want_from: int, encoded: Encoded | None = None) -> torch.Tensor:
    """ids [B, T] through the model in chunks (activations bounded however long the prompt is): logits
    [B, T - want_from, V] of positions want_from.., the only ones computed. encoded: a media prompt's
    embeddings and deepstack features, taken chunk by chunk."""
    t, parts = ids.shape[1], []
    size = cache_policy.PREFILL_CHUNK  # bounds a long prompt's activations (the MoE's pairs, attention)
    for first in range(0, t, size):
        end = min(t, first + size)
        keep = max(0, end - max(first, want_from))
        embeds, deepstack = encoded.chunk(first, end) if encoded is not None else (None, None)
        parts.append(model.forward(ids[:, first:end], torch.arange(first, end, device=ids.device),
                                   list(range(first, end)), keep=keep, embeds=embeds, deepstack=deepstack))
    return torch.cat(parts, dim=1)


def fidelity(native_logits: torch.Tensor, our_logits: torch.Tensor, continuation_ids=None) -> dict:
    """Compare [n, V] logits at the same positions. continuation_ids: the tokens native produced
    (default: native's argmax, i.e. its greedy continuation)."""
    native, ours = native_logits.float().cpu(), our_logits.float().cpu()
    if native.shape != ours.shape:
        raise InputError(f"logit shapes differ: native {tuple(native.shape)}, ours {tuple(ours.shape)}")
    for side, logits in (("native", native), ("ours", ours)):
        if not torch.isfinite(logits).all():  # a NaN would slip through every mean and max below
            raise InputError(f"{side} logits hold NaN or inf: fidelity cannot be measured")
    cont = native.argmax(-1) if continuation_ids is None else torch.as_tensor(list(continuation_ids))
    log_n, log_o = native.log_softmax(-1), ours.log_softmax(-1)
    kl = (log_n.exp() * (log_n - log_o)).sum(-1)
    nll = -log_o.gather(-1, cont[:, None]).squeeze(-1)
    return dict(top1_agreement=(native.argmax(-1) == ours.argmax(-1)).float().mean().item(),
                mean_kl=kl.mean().item(), perplexity=math.exp(nll.mean().item()), positions=native.shape[0])
