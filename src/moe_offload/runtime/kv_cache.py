"""The KV cache and what positions index: every layer's keys and values, the RoPE tables, the causal masks.

Allocated once for the longest sequence asked for (gpt-fast's KVCache, with the tables beside it).
`version` changes with each allocation: a CUDA graph holds the addresses of the buffers it was captured
with, so graphs compare versions and are captured again.
"""

from __future__ import annotations

import torch

from ..checkpoint.layouts import TextConfig
from ..errors import InputError


class KVCache:
    def __init__(self, cfg: TextConfig, layers: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.layers, self.device, self.dtype = cfg, layers, device, dtype
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** half)
        self.k: list[torch.Tensor] = []  # per layer [B, kv_heads, S, D]
        self.v: list[torch.Tensor] = []
        self.batch = self.max_seq_len = 0
        self.version = 0
        self.multimodal = False  # the rope tables hold a multimodal prompt's positions (set_rope)

    def setup(self, batch: int, seq_len: int) -> None:
        """Room for `batch` rows of `seq_len` positions (kept if there is room already: positions past the
        current one are masked, so stale entries are harmless)."""
        if self.max_seq_len >= seq_len and self.batch >= batch:
            return
        batch, seq_len = max(batch, self.batch), max(seq_len, self.max_seq_len)
        shape = (batch, self.cfg.num_kv_heads, seq_len, self.cfg.head_dim)
        where = dict(dtype=self.dtype, device=self.device)
        self.k = [torch.zeros(shape, **where) for _ in range(self.layers)]
        self.v = [torch.zeros(shape, **where) for _ in range(self.layers)]
        freqs = torch.arange(seq_len, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1).to(self.device)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)  # cast as transformers casts
        self.positions = torch.arange(seq_len, device=self.device)
        self.batch, self.max_seq_len = batch, seq_len
        self.version += 1
        self.multimodal = False

    def set_rope(self, rope: torch.Tensor | None = None, delta: int = 0, sections=()) -> None:
        """Each cache slot's rotary angles, written in place (graphs hold these tables): slots 0..T-1 at the
        prompt's three MRoPE streams rope [3, T], interleaved as transformers' thinker does (frequency j
        from stream 1 where j % 3 == 1 and j < 3 * sections[1], stream 2 likewise, else stream 0); later
        slots, decoded tokens, at slot + delta on all three. None: the text table, slot = position."""
        if rope is None and not self.multimodal:
            return
        slots = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = slots[:, None] * self.inv_freq[None, :]
        if rope is not None:
            t = rope.shape[1]
            freqs[t:] = (slots[t:, None] + delta) * self.inv_freq[None, :]
            stream = torch.zeros(self.inv_freq.shape[0], dtype=torch.long)
            j = torch.arange(self.inv_freq.shape[0])
            for s in (1, 2):
                stream[(j % 3 == s) & (j < 3 * sections[s])] = s
            per_stream = rope.cpu().to(torch.float32)[:, :, None] * self.inv_freq[None, None, :]  # [3, T, D/2]
            freqs[:t] = per_stream.gather(0, stream.expand(t, -1)[None]).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1).to(self.device)
        self.cos.copy_(emb.cos().to(self.dtype))
        self.sin.copy_(emb.sin().to(self.dtype))
        self.multimodal = rope is not None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, end: int):
        """Write k, v [B, kv_heads, T, D] at positions end - T .. end - 1 (a forward's positions are
        contiguous: a slice copy, not an index_put); return the layer's keys and values up to `end`."""
        b, t = k.shape[0], k.shape[2]
        self.k[layer][:b, :, end - t:end] = k
        self.v[layer][:b, :, end - t:end] = v
        return self.k[layer][:b, :, :end], self.v[layer][:b, :, :end]

    def mask(self, pos: torch.Tensor) -> torch.Tensor:
        """[S]: which cache positions a token at pos [1] sees, over the whole cache (a decode step's shapes
        never change). Made per step: a stored [S, S] mask would be a GB at 32k."""
        return self.positions <= pos

    def end_of(self, positions: list[int]) -> int:
        """The KV length a step at these positions sees; one line if they run past the cache or are not a run
        of consecutive positions (the KV write and RoPE are slices)."""
        end = positions[-1] + 1
        if end - positions[0] != len(positions):
            raise InputError(f"positions {positions[0]}..{positions[-1]} are not {len(positions)} consecutive ones")
        if end > self.max_seq_len:
            raise InputError(f"position {end - 1} is past the KV cache ({self.max_seq_len}): call setup_caches")
        return end
