"""The device sampler: Gumbel-max over a hash of (seed, position, row, token) draws from the softmax of the
filtered logits, in transformers' order (temperature, top-k, top-p)."""

from __future__ import annotations

import pytest
import torch

from moe_offload.errors import InputError
from moe_offload.runtime.sampler import Sampler, hash_uniform

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])


def draw(sampler, n=20000):
    logits = PROBS.log()[None]
    return torch.stack([sampler(logits, torch.tensor([pos])) for pos in range(n)]).view(-1)


def test_hash_uniform_is_uniform_and_a_function_of_its_inputs():
    cols = torch.arange(50000).expand(2, -1)
    u = hash_uniform(torch.tensor([7]), torch.tensor([3]), cols)
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1])  # rows differ
    assert torch.equal(u, hash_uniform(torch.tensor([7]), torch.tensor([3]), cols))
    assert not torch.equal(u, hash_uniform(torch.tensor([8]), torch.tensor([3]), cols))
    assert not torch.equal(u, hash_uniform(torch.tensor([7]), torch.tensor([4]), cols))
    # a token's noise depends on its id, not on which others are drawn with it (top-k keeps a subset)
    assert torch.equal(hash_uniform(torch.tensor([7]), torch.tensor([3]), cols[:, [5, 900]]), u[:, [5, 900]])


def test_samples_follow_the_softmax():
    freq = torch.bincount(draw(Sampler(torch.device("cpu"), temperature=1.0)), minlength=4) / 20000
    assert (freq - PROBS).abs().max() < 0.015


def test_temperature_top_k_and_top_p_filter_as_transformers():
    cpu = torch.device("cpu")
    sharp = torch.bincount(draw(Sampler(cpu, temperature=0.5), 5000), minlength=4) / 5000
    want = PROBS ** 2 / (PROBS ** 2).sum()  # logits / 0.5
    assert (sharp - want).abs().max() < 0.025
    assert set(draw(Sampler(cpu, temperature=1.0, top_k=2), 2000).tolist()) == {0, 1}
    assert set(draw(Sampler(cpu, temperature=1.0, top_p=0.6), 2000).tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.75
    assert set(draw(Sampler(cpu, temperature=0.0), 100).tolist()) == {0}


@pytest.mark.parametrize("settings", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_settings_are_refused(settings):
    with pytest.raises(InputError, match="sampling needs"):
        Sampler(torch.device("cpu"), **{"temperature": 1.0, **settings})


def test_top_k_draws_what_the_whole_vocabulary_would():
    """Sampling among the k best equals sampling the whole vocabulary with the others masked out."""
    cpu = torch.device("cpu")
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    kth = torch.topk(logits, 40).values[:, -1:]
    masked = logits.masked_fill(logits < kth, float("-inf"))
    for pos in range(50):
        p = torch.tensor([pos])
        assert torch.equal(Sampler(cpu, 0.9, top_k=40, top_p=0.8)(logits, p), Sampler(cpu, 0.9, top_p=0.8)(masked, p))


@pytest.mark.parametrize("top_p", [None, 0.8], ids=["top_k", "top_k_top_p"])
def test_the_fused_pick_draws_the_pytorch_paths_tokens(top_p):
    """After a top-k, CUDA picks with one Triton kernel (here under its interpreter): the same tokens as
    the PyTorch path, for every row, position and seed, ties among the candidates included."""
    from moe_offload.runtime import kernels

    cpu = torch.device("cpu")
    if not kernels.available(cpu):
        pytest.fail("needs triton with TRITON_INTERPRET=1 (set in conftest)")
    assert not Sampler(cpu, 0.7, top_k=40).fused  # by default on CUDA only
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    logits[1, :60] = 2.5  # a row whose candidates all tie
    for seed in (0, 7):
        fused = Sampler(cpu, 0.7, top_k=40, top_p=top_p, seed=seed, fused=True)
        plain = Sampler(cpu, 0.7, top_k=40, top_p=top_p, seed=seed, fused=False)
        for pos in range(12):
            p = torch.tensor([pos])
            assert torch.equal(fused(logits, p), plain(logits, p))
    # top-p over more candidates than the kernel's [k, k] tile holds: the PyTorch path, the same draws
    big = dict(top_k=300, top_p=0.8 if top_p else None)
    p = torch.tensor([3])
    assert torch.equal(Sampler(cpu, 0.7, fused=True, **big)(logits, p), Sampler(cpu, 0.7, fused=False, **big)(logits, p))
