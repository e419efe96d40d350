"""What every benchmark script shares: the prompt the speed runs decode from, random prompts of a given
length, and printing one JSON object.
The model dimensions and building a checkpoint are the package's (moe_offload.checkpoint.dims,
moe_offload.checkpoint.extracted.build_and_extract), shared with the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPT = ("The capital of France is Paris. Once upon a time there was a small robot who wanted to learn how "
          "to paint the sea.")


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    """n token ids drawn from a seeded generator, clear of the vocabulary's first and last 16 (special ids):
    the same prompt for the same (n, seed) in every script."""
    return torch.randint(16, vocab_size - 16, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
