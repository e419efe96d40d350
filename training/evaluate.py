"""Held-out perplexity by depth, routing statistics and greedy samples of a trained checkpoint, as JSON.

Runs transformers' own `Qwen3OmniMoeThinkerForConditionalGeneration` loaded from the checkpoint. A
depth-N figure is the model truncated to its first N layers (final norm and lm_head after layer N),
which is what the workflow's depth-N run computes.

  python training/evaluate.py models/default            # prints JSON
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import DATA, _text_model, depth_losses, load_tokenizer, token_stream, windows  # noqa: E402

DEPTHS = (1, 8, 16, 24, 48)
PROMPTS = ["The capital of France is", "Once upon a time there was a small robot",
           "A hacker is a person who"]


def load_thinker(checkpoint: Path, device: str = "cpu"):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model.to(device).eval()


def evaluate(checkpoint: Path, heldout_path: Path = DATA / "heldout.txt", depths=DEPTHS, seq_len: int = 256,
             batch: int = 16, device: str = "cpu", max_windows: int = 0, max_new_tokens: int = 32) -> dict:
    checkpoint = Path(checkpoint)
    thinker = load_thinker(checkpoint, device)
    cfg = thinker.config.text_config
    depths = sorted({d for d in depths if d <= cfg.num_hidden_layers} | {cfg.num_hidden_layers})
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    held = windows(token_stream(tokenizer, heldout_path), seq_len)
    if max_windows:
        held = held[:max_windows]
    totals = {d: 0.0 for d in depths}
    experts_needed, overlap, pairs = [], torch.zeros(cfg.num_hidden_layers), 0
    mass = torch.zeros(cfg.num_hidden_layers, cfg.num_experts)
    with torch.no_grad():
        for start in range(0, len(held), batch):
            chunk = held[start:start + batch].to(device)
            losses, _, router_logits = depth_losses(thinker, chunk, depths)
            for d in depths:
                totals[d] += losses[d].item() * len(chunk)
            for layer, logits in enumerate(router_logits):
                probs = torch.softmax(logits.float(), dim=-1)
                weights, chosen = probs.topk(cfg.num_experts_per_tok, dim=-1)
                weights = weights / weights.sum(-1, keepdim=True)
                mass[layer].index_add_(0, chosen.reshape(-1).cpu(), weights.reshape(-1).cpu())
                hot = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, chosen, True)
                hot = hot.reshape(len(chunk), -1, cfg.num_experts)  # [B, T, E]
                overlap[layer] += (hot[:, 1:] & hot[:, :-1]).sum().item() / cfg.num_experts_per_tok
            pairs += len(chunk) * (chunk.shape[1] - 2)
    for layer_mass in mass:
        cumulative = layer_mass.sort(descending=True).values.cumsum(0) / layer_mass.sum()
        experts_needed.append(int((cumulative < 0.9 - 1e-6).sum()) + 1)
    reuse = (overlap / pairs).tolist()
    result = {
        "checkpoint": str(checkpoint),
        "heldout_tokens": int(held[:, 1:].numel()),
        "heldout_perplexity": {d: round(math.exp(totals[d] / len(held)), 2) for d in depths},
        "routing": {
            "experts_for_90pct_mass": round(sum(experts_needed) / len(experts_needed), 2),
            "token_to_token_reuse": round(sum(reuse) / len(reuse), 3),
            "num_experts": cfg.num_experts, "experts_per_token": cfg.num_experts_per_tok,
            "experts_for_90pct_mass_per_layer": experts_needed,
            "token_to_token_reuse_per_layer": [round(r, 3) for r in reuse],
        },
    }
    if max_new_tokens:
        result["samples"] = samples(thinker, tokenizer, depths, max_new_tokens, device)
    return result


@torch.no_grad()
def samples(thinker, tokenizer, depths, max_new_tokens: int, device) -> dict:
    """Greedy continuations of PROMPTS by the model truncated to each depth."""
    lm = _text_model(thinker)
    all_layers, cfg = lm.layers, thinker.config.text_config
    full = cfg.num_hidden_layers
    out = {}
    try:
        for depth in depths:
            lm.layers = all_layers[:depth]
            cfg.num_hidden_layers = depth
            texts = []
            for prompt in PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt").to(device)
                new = thinker.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
                texts.append(prompt + tokenizer.decode(new[0, ids["input_ids"].shape[1]:]))
            out[depth] = texts
    finally:
        lm.layers, cfg.num_hidden_layers = all_layers, full
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--heldout", type=Path, default=DATA / "heldout.txt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-windows", type=int, default=0, help="evaluate on the first N windows (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="sample length (0: no samples)")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        print(f"error: {args.checkpoint} has no config.json", file=sys.stderr)
        return 1
    print(json.dumps(evaluate(args.checkpoint, args.heldout, device=args.device, max_windows=args.max_windows,
                              max_new_tokens=args.max_new_tokens), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
