"""Checkpoint stage: layouts, shards, sources, synthetic builds, extraction, validation."""
