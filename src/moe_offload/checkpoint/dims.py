"""Model dimensions, written once: the real Qwen3-Omni-30B-A3B thinker's text model, and the synthetic
specs (model.synthetic's keys) that benchmarks and tests build at its dimensions or at the toy ones.
"""

from __future__ import annotations

# The hub checkpoint's thinker text_config (config.json), as far as the text model reads it.
THINKER_TEXT = dict(
    vocab_size=152064, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True})
REAL_LAYERS = THINKER_TEXT["num_hidden_layers"]

# Synthetic specs without num_layers, layout and seed (each caller picks those). Every layer has experts,
# as in the real thinker, so its dense intermediate_size is not needed.
DIMS = {
    # config/config.yaml's synthetic model
    "tiny": dict(num_experts=16, experts_per_token=4, hidden_size=64, moe_intermediate_size=32, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=512, max_shard_size="1MB", initializer_range=0.1),
    # the thinker's, with 4-GB shards so that layers straddle them; initializer_range transformers' default
    # for these models
    "real": dict(num_experts=THINKER_TEXT["num_experts"], experts_per_token=THINKER_TEXT["num_experts_per_tok"],
                 hidden_size=THINKER_TEXT["hidden_size"], moe_intermediate_size=THINKER_TEXT["moe_intermediate_size"],
                 num_heads=THINKER_TEXT["num_attention_heads"], num_kv_heads=THINKER_TEXT["num_key_value_heads"],
                 head_dim=THINKER_TEXT["head_dim"], vocab_size=THINKER_TEXT["vocab_size"], max_shard_size="4GB",
                 initializer_range=0.02),
}


def spec(dims: str, num_layers: int, layout: str = "qwen3_omni_thinker", **overrides) -> dict:
    """A whole synthetic spec at `dims` ("tiny" or "real"), seed 0, every layer with experts."""
    return {**DIMS[dims], "layout": layout, "num_layers": num_layers, "seed": 0, "mlp_only_layers": [], **overrides}
