"""Picking the next token on the device, so that a decode step's CUDA graph can pick it itself.

Greedy, or sampled with temperature, top-k and top-p in transformers' order. A sampled token is the
arg-max of the filtered logits plus Gumbel noise (the Gumbel-max trick: the same distribution as drawing
from the softmax), and the noise is a hash of (seed, position, batch row, token id) rather than a
generator's state: a token depends only on the seed and where it is, so every decode path (careful,
graph, pipelined, a step redone after a miss) and every replay of a graph draws the same one, and no
generator has to be registered with a graph.
"""

from __future__ import annotations

import torch

from ..errors import InputError


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX = [_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def hash_uniform(seed: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Floats in (0, 1) of cols' shape [rows, n] (token ids), a function of (seed, pos, row, token id) alone
    (splitmix64's finaliser; int64 products wrap around)."""
    row = torch.arange(cols.shape[0], device=cols.device)[:, None]
    z = seed * _MIX[1] + pos.view(-1)[:1] * _MIX[2] + (row << 32) + cols + _MIX[0]
    z = (z ^ _shr(z, 30)) * _MIX[1]
    z = (z ^ _shr(z, 27)) * _MIX[2]
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) / float(1 << 24)


class Sampler:
    """`sampler(logits [B, V], pos [1]) -> tokens [B]`, all on the device. The temperature, top-p and seed are
    device tensors that `update` rewrites in place, so a captured graph samples with the values of the
    current call; top-k and whether top-p applies shape the computation (`key`)."""

    def __init__(self, device: torch.device, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0):
        self.temperature = torch.zeros(1, device=device)
        self.top_p = torch.ones(1, device=device)
        self.seed = torch.zeros(1, dtype=torch.long, device=device)
        self.update(temperature, top_k, top_p, seed)

    def update(self, temperature: float, top_k: int | None, top_p: float | None, seed: int) -> None:
        if temperature < 0 or (top_k is not None and top_k < 0) or (top_p is not None and not 0 < top_p <= 1):
            raise InputError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                             f"{temperature}, {top_k}, {top_p}")
        self.greedy = temperature == 0
        self.k = top_k or None
        self.uses_top_p = top_p is not None and top_p < 1
        self.temperature.fill_(temperature or 1.0)
        self.top_p.fill_(top_p if self.uses_top_p else 1.0)
        self.seed.fill_(seed)

    @property
    def key(self) -> tuple:
        """What a graph that samples with this sampler was captured for."""
        return ("greedy",) if self.greedy else ("sampled", self.k, self.uses_top_p)

    def __call__(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.k:  # the k best only (the rest are out whatever top-p says): top-p sorts k values, not the vocab
            logits, ids = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1)
        else:
            ids = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape)
        if self.uses_top_p:
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
            drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        noise = -torch.log(-torch.log(hash_uniform(self.seed, pos, ids)))  # by token id: the same whatever k
        return ids.gather(-1, (logits + noise).argmax(dim=-1, keepdim=True)).squeeze(-1)
