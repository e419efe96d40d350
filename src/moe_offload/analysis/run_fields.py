"""Fields of a recorded depth run that several reports read the same way."""

from __future__ import annotations


def expert_bits(run: dict) -> int:
    """The bits of the experts a depth run read (16 for runs recorded before quantization)."""
    return run.get("experts", {}).get("bits", 16)
