"""moe_offload: split an MoE checkpoint into per-layer expert files, prove the bytes, run it selectively."""

__version__ = "0.1.0"
