"""Train the workflow's default model: a small Qwen3-Omni thinker (48 layers, 16 experts, top-4) on the
public-domain corpus in training/data, saved as a full checkpoint in the hub layout.

The model is built with transformers' own classes by the same builder as the synthetic default
(moe_offload.checkpoint.synthetic), so names, shards and config match the real checkpoint. Loss: next
token cross-entropy at full depth, plus (weight --exit-weight) the same at the truncated depths the
workflow runs (1, 8, 16, 24: final norm and lm_head applied after layer N), so that a truncated run
degrades gracefully instead of reading an untrained residual stream, plus transformers' router
load-balancing loss applied per layer. AdamW, warmup then cosine decay over --steps, --epochs or
--time-budget-s (whichever ends first), residual dropout, bf16 autocast on CUDA, seeded. The held-out
loss is measured every --eval-every steps and the best weights are the ones saved (see README.md).

  python training/train_default.py --device cuda --time-budget-s 400 --out /tmp/default
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TRAINING = Path(__file__).resolve().parent
# Runs from a plain checkout too (the GPU machine has torch and transformers, not this package installed).
sys.path.append(str(TRAINING.parent / "src"))
DATA = TRAINING / "data"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The shipped default's shape: tens of MB in bf16, layers' experts straddling 4 MB shards.
DEFAULT_SPEC = dict(layout="qwen3_omni_thinker", num_layers=48, num_experts=16, experts_per_token=4,
                    hidden_size=128, moe_intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=32,
                    mlp_only_layers=[], vocab_size=4096, initializer_range=0.02, max_shard_size="4MB")
EXIT_DEPTHS = (1, 8, 16, 24)



def _text_model(thinker):
    """The thinker's text decoder: `model.language_model` in transformers 5.23, `model` itself in 5.17 (the
    GPU machine's)."""
    return getattr(thinker.model, "language_model", thinker.model)

def load_tokenizer(path: Path = DATA / "tokenizer.json"):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)


def token_stream(tokenizer, path: Path) -> torch.Tensor:
    """The file's paragraphs (one a line) as one stream of token ids, newlines kept."""
    return torch.tensor(tokenizer(path.read_text())["input_ids"], dtype=torch.long)


def build_model(spec: dict, seed: int):
    """The full Qwen3-Omni model (thinker plus a tiny talker and code2wav, as in the real checkpoint)."""
    from moe_offload.checkpoint.synthetic import BUILDERS

    torch.manual_seed(seed)
    return BUILDERS[spec["layout"]](spec)


def depth_losses(thinker, ids: torch.Tensor, depths):
    """Mean next-token cross-entropy (float32) of ids [B, T] when the model stops after each depth in
    depths (final norm and lm_head applied to that layer's output, as a model truncated to that many
    layers computes). Returns ({depth: loss}, aux_loss, router_logits)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

    out = thinker(input_ids=ids[:, :-1], output_hidden_states=True, output_router_logits=True, use_cache=False)
    lm, cfg = _text_model(thinker), thinker.config.text_config
    # transformers' balancing loss pools all layers' counts; a layer could then use a few experts as long
    # as other layers use others. Balance each layer, as the cache sees them, and average.
    router_logits = out.router_logits or ()
    aux = sum((load_balancing_loss_func((logits,), cfg.num_experts, cfg.num_experts_per_tok)
               for logits in router_logits), torch.zeros((), device=ids.device)) / max(1, len(router_logits))
    targets = ids[:, 1:].reshape(-1)
    losses = {}
    for depth in depths:
        # hidden_states[N] is layer N's output, except the last, which transformers stores after the final norm
        logits = out.logits if depth == cfg.num_hidden_layers else thinker.lm_head(lm.norm(out.hidden_states[depth]))
        losses[depth] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets)
    return losses, aux, router_logits


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of length+1 tokens (input plus next-token target), [N, length+1]."""
    n = (len(stream) - 1) // length
    return torch.stack([stream[i * length: i * length + length + 1] for i in range(n)])


@torch.no_grad()
def heldout_losses(thinker, heldout: torch.Tensor, depths, batch: int, device, autocast) -> dict[int, float]:
    was_training = thinker.training
    thinker.eval()
    totals = {d: 0.0 for d in depths}
    for start in range(0, len(heldout), batch):
        chunk = heldout[start:start + batch].to(device)
        with autocast():
            losses, _, _ = depth_losses(thinker, chunk, depths)
        for d in depths:
            totals[d] += losses[d].item() * len(chunk)
    thinker.train(was_training)
    return {d: totals[d] / len(heldout) for d in depths}


def add_dropout(thinker, p: float) -> None:
    """Dropout on each attention and MoE block's output before its residual add, in training mode only
    (the Qwen3 config has no such option; the corpus is small enough to overfit). Nothing is saved."""
    def hook(module, inputs, output):
        if not module.training or p == 0:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    for layer in _text_model(thinker).layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (floor + (1 - floor) * cosine)


def save_checkpoint(model, tokenizer, out: Path, max_shard_size: str, report: dict) -> Path:
    """The full model in bf16 at out, in the hub layout; written beside and renamed, so out is whole or absent."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and save_pretrained make them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def train(args, spec: dict) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    tokenizer = load_tokenizer(args.data / "tokenizer.json")
    train_ids = token_stream(tokenizer, args.data / "train.txt")
    heldout = windows(token_stream(tokenizer, args.data / "heldout.txt"), args.seq_len)
    if args.heldout_windows:
        heldout = heldout[:args.heldout_windows]
    model = build_model(spec, args.seed)
    thinker = model.thinker.to(device)
    add_dropout(thinker, args.dropout)
    steps = min(args.steps, math.ceil(args.epochs * len(train_ids) / (args.batch * args.seq_len)))
    thinker.train()
    depths = sorted({d for d in EXIT_DEPTHS if d < spec["num_layers"]} | {spec["num_layers"]})
    full = spec["num_layers"]
    decay = [p for n, p in thinker.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in thinker.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.monotonic()
    initial = heldout_losses(thinker, heldout, depths, args.batch, device, autocast)
    best = (initial[full], 0, copy.deepcopy(thinker.state_dict()))
    print(json.dumps({"step": 0, "heldout": initial}), flush=True)
    step, train_loss = 0, float("nan")
    while step < steps:
        elapsed = time.monotonic() - start
        progress = max(step / steps, elapsed / args.time_budget_s if args.time_budget_s else 0.0)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        offsets = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[o:o + args.seq_len + 1] for o in offsets.tolist()]).to(device)
        with autocast():
            losses, aux, _ = depth_losses(thinker, batch, depths)
            exits = [losses[d] for d in depths if d != full]
            loss = losses[full] + args.exit_weight * sum(exits) / max(1, len(exits)) + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(thinker.parameters(), 1.0)
        optimizer.step()
        step += 1
        train_loss = losses[full].item()
        if step % args.eval_every == 0 or step == steps:
            held = heldout_losses(thinker, heldout, depths, args.batch, device, autocast)
            row = {"step": step, "seconds": round(time.monotonic() - start, 1), "train_loss": round(train_loss, 4),
                   "aux_loss": round(aux.item(), 4), "heldout": {d: round(v, 4) for d, v in held.items()}}
            history.append(row)
            print(json.dumps(row), flush=True)
            if held[full] < best[0]:
                best = (held[full], step, copy.deepcopy(thinker.state_dict()))
    final = heldout_losses(thinker, heldout, depths, args.batch, device, autocast)
    if final[full] < best[0]:
        best = (final[full], step, None)
    elif best[2] is not None:
        thinker.load_state_dict(best[2])  # held-out loss rose since: keep the best weights seen
        final = heldout_losses(thinker, heldout, depths, args.batch, device, autocast)
    seconds = time.monotonic() - start
    report = {
        "spec": spec, "seed": args.seed, "device": str(device), "steps": step, "kept_step": best[1],
        "seconds": round(seconds, 1), "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "epochs_seen": round(step * args.batch * args.seq_len / len(train_ids), 2), "dropout": args.dropout,
        "exit_weight": args.exit_weight, "aux_weight": args.aux_weight, "train_tokens": len(train_ids),
        "tokens_seen": step * args.batch * args.seq_len, "last_train_loss": round(train_loss, 4),
        "heldout_loss_initial": {d: round(v, 4) for d, v in initial.items()},
        "heldout_loss": {d: round(v, 4) for d, v in final.items()},
        "heldout_perplexity": {d: round(math.exp(v), 2) for d, v in final.items()},
        "history": history,
    }
    model.thinker.to("cpu")
    save_checkpoint(model, tokenizer, args.out, spec["max_shard_size"], report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=100_000, help="at most this many optimizer steps")
    parser.add_argument("--epochs", type=float, default=30, help="at most this many passes over the corpus")
    parser.add_argument("--dropout", type=float, default=0.1, help="residual dropout while training")
    parser.add_argument("--time-budget-s", type=float, default=0.0, help="stop after this long (0: no limit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--exit-weight", type=float, default=0.1,
                        help="weight of the mean loss at truncated depths 1, 8, 16, 24 (0: full depth only)")
    parser.add_argument("--aux-weight", type=float, default=0.01, help="router load-balancing loss weight")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--heldout-windows", type=int, default=0, help="evaluate on the first N windows (0: all)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--max-shard-size", default=DEFAULT_SPEC["max_shard_size"])
    for key in ("num_layers", "hidden_size", "moe_intermediate_size", "num_experts", "head_dim"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=DEFAULT_SPEC[key])
    args = parser.parse_args(argv)
    spec = {**DEFAULT_SPEC, **{k: getattr(args, k) for k in ("num_layers", "hidden_size", "moe_intermediate_size",
                                                            "num_experts", "head_dim", "max_shard_size")}}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available", file=sys.stderr)
        return 1
    for name in ("train.txt", "heldout.txt", "tokenizer.json"):
        if not (args.data / name).is_file():
            print(f"error: {args.data / name} not found (run training/prepare_corpus.py)", file=sys.stderr)
            return 1
    report = train(args, spec)
    summary = {k: report[k] for k in ("steps", "kept_step", "seconds", "tokens_seen", "heldout_perplexity")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
