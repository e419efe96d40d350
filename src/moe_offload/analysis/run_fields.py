"""Fields of a recorded depth run that several reports read the same way."""

from __future__ import annotations


def expert_bits(run: dict) -> int:
    """The bits of the experts a depth run read (16 for runs recorded before quantization)."""
    return run.get("experts", {}).get("bits", 16)


def expert_scheme(run: dict) -> str:
    """How a depth run's experts were stored, for labels: "16-bit", "int4", "int4 + int8 hot (4/layer)"."""
    experts = run.get("experts", {})
    bits, hot = experts.get("bits", 16), experts.get("hot_bits")
    if bits == 16:
        return "16-bit"
    return f"int{bits}" + (f" + int{hot} hot ({experts.get('hot_per_layer')}/layer)" if hot else "")
