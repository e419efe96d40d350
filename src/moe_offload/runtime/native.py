"""The reference: transformers' own model on the original checkpoint, run the ordinary way."""

from __future__ import annotations

import time

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from ..checkpoint.layouts import detect_checkpoint


def load_native(checkpoint_dir, device: torch.device, dtype: torch.dtype, experts_implementation: str | None = None):
    """The text model (for Qwen3-Omni: the thinker only, no talker, no audio output)."""
    layout, _ = detect_checkpoint(checkpoint_dir)
    cls = getattr(transformers, layout.native_class)
    model = cls.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model


class _FirstTokenClock(BaseStreamer):
    """generate() hands the streamer the prompt, then each new token: the second call marks the end
    of the prefill."""

    def __init__(self, device: torch.device):
        self.device, self.calls, self.first_token_at = device, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


@torch.inference_mode()
def native_generate(model, input_ids: list[int], max_new_tokens: int, eos_token_id=None) -> dict:
    """Greedy decoding with transformers' generate(); prefill and decode timed apart."""
    device = model.device
    ids = torch.tensor([input_ids], device=device)
    clock = _FirstTokenClock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id, streamer=clock)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    new = out[0, len(input_ids):].tolist()
    prefill = clock.first_token_at - start
    decode = end - clock.first_token_at
    return {"output_ids": new, "prefill_s": prefill, "decode_s": decode,
            "tok_s": (len(new) - 1) / decode if len(new) > 1 and decode > 0 else 0.0}


@torch.inference_mode()
def native_teacher_forced_logits(model, prompt_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
    """[n, V] float32 logits predicting each continuation token, from one forward pass."""
    ids = torch.tensor([list(prompt_ids) + list(continuation_ids)], device=model.device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits[len(prompt_ids) - 1: -1].float().cpu()
