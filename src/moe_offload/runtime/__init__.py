"""Runtime stage: expert files and cache, cache policy, the selective model, decoding, native baseline."""
