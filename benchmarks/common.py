"""What every benchmark script shares: the prompt the speed runs decode from, and printing one JSON object.
The model dimensions and building a checkpoint are the package's (moe_offload.checkpoint.dims,
moe_offload.checkpoint.extracted.build_and_extract), shared with the tests."""

from __future__ import annotations

import json
from pathlib import Path

PROMPT = ("The capital of France is Paris. Once upon a time there was a small robot who wanted to learn how "
          "to paint the sea.")


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
