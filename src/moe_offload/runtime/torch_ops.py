"""The decode step's operations in PyTorch, with the signatures of the Triton kernels (kernels.py,
moe_kernels.py): the fused step runs on them where the kernels cannot (no Triton, the CPU, a checkpoint
whose shapes the kernels do not serve). Each rounds as the reference model rounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint.quantize import dequantize
from ..errors import InputError
from .model import norm_rotate, rms_norm as _rms


def rms_norm(x, weight, eps, delta=None):
    if delta is None:
        return _rms(x, weight, eps)
    summed = x + delta
    return _rms(summed, weight, eps), summed


def linear(x, w):
    return F.linear(x, w)


def norm_linear(x, norm, eps, w, delta=None):
    if delta is None:
        return F.linear(_rms(x, norm, eps), w)
    normed, summed = rms_norm(x, norm, eps, delta)
    return F.linear(normed, w), normed, summed


def attention(qkv, q_norm, k_norm, cos, sin, pos, k_cache, v_cache, mask, n_heads, n_kv, eps, scale):
    d = q_norm.numel()
    qk, v = qkv.split([(n_heads + n_kv) * d, n_kv * d])
    # cos[pos], sin[pos]: [1, D], pos stays on the device
    qk = norm_rotate(qk.view(n_heads + n_kv, d), q_norm, k_norm, n_heads, cos[pos], sin[pos], eps)
    q, k = qk.unsqueeze(1).split([n_heads, n_kv])  # [heads, 1, D]
    k_cache[0].index_copy_(1, pos, k)
    v_cache[0].index_copy_(1, pos, v.view(n_kv, 1, d))
    y = F.scaled_dot_product_attention(q[None], k_cache[:1], v_cache[:1], attn_mask=mask.view(1, 1, 1, -1),
                                       scale=scale, enable_gqa=n_heads != n_kv)
    return y.reshape(-1)


def route(logits, table, k, norm_topk_prob, record=None, policy=None):
    if policy is not None:
        raise InputError("in-place misses need the Triton kernels")
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, k)
    if norm_topk_prob:
        top_w = top_w / top_w.sum()
    top_w = top_w.to(logits.dtype)
    if record is not None:
        record[0].copy_(top_i)
        record[1].copy_(top_w)
    # an absent expert (slot -1) reads slot 0 instead, as the route kernel has it
    return top_i, top_w, table[top_i].clamp(min=0), None


def moe(x, w1, w2, slots, weights, resid=None, host=None, quant=None):
    """The k experts gathered from their slots and applied in two batched products. quant: (s1, s2, bits,
    group_size) of quantized slabs, whose gathered experts are dequantized here (torch: a 16-bit copy of
    the k experts; the kernels dequantize in registers)."""
    if host is not None:
        raise InputError("in-place misses need the Triton kernels")
    g1, g2 = w1[slots], w2[slots]
    if quant is not None:
        s1, s2, bits, _ = quant
        g1, g2 = dequantize(g1, s1[slots], bits, x.dtype), dequantize(g2, s2[slots], bits, x.dtype)
    gate, up = torch.matmul(g1, x).chunk(2, dim=-1)  # [k, I] each
    y = torch.matmul(g2, (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [k, H]
    out = (y * weights[:, None]).sum(0)
    return out if resid is None else resid + out
