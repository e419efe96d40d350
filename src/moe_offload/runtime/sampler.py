"""Picking the next token on the device, so that a decode step's CUDA graph can pick it itself.

Greedy, or sampled with temperature, top-k and top-p in transformers' order. A sampled token is the
arg-max of the filtered logits plus Gumbel noise (the Gumbel-max trick: the same distribution as drawing
from the softmax), and the noise is a hash of (seed, position, batch row, token id) rather than a
generator's state: a token depends only on the seed and where it is, so every decode path (careful,
graph, pipelined, a step redone after a miss) and every replay of a graph draws the same one, and no
generator has to be registered with a graph.

On CUDA, with top-k, what follows the top-k (temperature, top-p, the noise, the pick) is one Triton kernel:
in PyTorch it is some forty tiny kernels, as long as a whole layer of a decode step.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .kernels import on_gpu, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _pick_kernel(vals_ptr, ids_ptr, temp_ptr, top_p_ptr, seed_ptr, pos_ptr, out_ptr, k, M0, M1, M2,
                     TOP_P: tl.constexpr, BLOCK: tl.constexpr):
        # Program: one batch row's k candidates (logits and token ids, from torch.topk)
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        m = j < k
        v = tl.load(vals_ptr + row * k + j, mask=m, other=float("-inf")).to(tl.float32) / tl.load(temp_ptr)
        ids = tl.load(ids_ptr + row * k + j, mask=m, other=0)
        if TOP_P:  # the PyTorch path's stable ascending sort, as each candidate's place among the others
            vi, vj = v[:, None], v[None, :]
            ji, jj = j[:, None], j[None, :]
            below = ((vj < vi) | ((vj == vi) & (jj <= ji))) & m[None, :]  # j sorts before i, or is i
            above = ((vj > vi) | ((vj == vi) & (jj > ji))) & m[None, :]
            p = tl.exp(v - tl.max(v, axis=0))
            p = p / tl.sum(p, axis=0)
            cum = tl.sum(tl.where(below, p[None, :], 0.0), axis=1)
            last = tl.sum(above.to(tl.int32), axis=1) == 0  # the most likely is always kept
            v = tl.where((cum <= 1 - tl.load(top_p_ptr)) & ~last, float("-inf"), v)
        # hash_uniform in uint64 (its signed int64 arithmetic wraps to the same bits)
        z = (tl.load(seed_ptr).to(tl.uint64) * M1 + tl.load(pos_ptr).to(tl.uint64) * M2
             + (row.to(tl.uint64) << 32) + ids.to(tl.uint64) + M0)
        z = (z ^ (z >> 30)) * M1
        z = (z ^ (z >> 27)) * M2
        z = z ^ (z >> 31)
        u = ((z >> 40).to(tl.float32) + 0.5) / 16777216.0
        score = tl.where(m, v - tl.log(-tl.log(u)), float("-inf"))
        best = tl.argmax(score, axis=0)
        tl.store(out_ptr + row, tl.sum(tl.where(j == best, ids, 0), axis=0))


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


# top-p in the kernel compares every candidate with every other: a [k, k] tile in one program's registers
FUSED_TOP_P_MOST = 128


class Sampler:
    """`sampler(logits [B, V], pos [1]) -> tokens [B]`, all on the device. The temperature, top-p and seed are
    device tensors that `update` rewrites in place, so a captured graph samples with the values of the
    current call; top-k and whether top-p applies shape the computation (`key`). fused: after a top-k,
    the Triton kernel (None: on CUDA where Triton is)."""

    def __init__(self, device: torch.device, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, fused: bool | None = None):
        self.fused = on_gpu(device) if fused is None else fused
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
        if self.k and self.fused and (not self.uses_top_p or self.k <= FUSED_TOP_P_MOST):
            # top-k on the raw logits (temperature keeps their order), then one kernel
            vals, ids = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1)
            return self._pick(vals.contiguous(), ids.contiguous(), pos)
        logits = logits.float() / self.temperature
        if self.k:  # the k best only (the rest are out whatever top-p says): top-p sorts k values, not the vocab
            logits, ids = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1)
        else:
            ids = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape)
        if self.uses_top_p:  # stable: tied logits in the same order on every path
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1, stable=True)
            drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        noise = -torch.log(-torch.log(hash_uniform(self.seed, pos, ids)))  # by token id: the same whatever k
        return ids.gather(-1, (logits + noise).argmax(dim=-1, keepdim=True)).squeeze(-1)

    def _pick(self, vals: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, k = vals.shape
        out = torch.empty(b, dtype=torch.long, device=vals.device)
        m0, m1, m2 = ((c + (1 << 64)) % (1 << 64) for c in _MIX)  # the same constants as uint64
        _pick_kernel[(b,)](vals, ids, self.temperature, self.top_p, self.seed, pos, out, k, m0, m1, m2,
                           TOP_P=self.uses_top_p, BLOCK=triton.next_power_of_2(k))
        return out
