"""The reference: transformers' own model on the original checkpoint, run the ordinary way."""

from __future__ import annotations

import time

import psutil
import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from ..checkpoint.layouts import detect_checkpoint


def load_native(checkpoint_dir, device: torch.device, dtype: torch.dtype, experts_implementation: str | None = None):
    """The text model (for Qwen3-Omni: the thinker only, no talker, no audio output), whole on `device`."""
    layout, _ = detect_checkpoint(checkpoint_dir)
    cls = getattr(transformers, layout.native_class)
    model = cls.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model


def offload_memory_map(device: torch.device, device_mb: int | None, cpu_mb: int | None = None) -> dict | None:
    """accelerate's max_memory: the budget on the compute device and, on CUDA, the host tier after it.
    On the CPU only the CPU is named (so a GPU that happens to be present stays unused); no budget there
    means 90% of the memory available now. On CUDA with no budget at all, accelerate measures itself."""
    if device.type == "cpu":
        if device_mb is None:
            device_mb = int(0.9 * psutil.virtual_memory().available / 2**20)
        return {"cpu": f"{device_mb}MiB"}
    if device_mb is None and cpu_mb is None:
        return None
    memory = {} if device_mb is None else {device.index or 0: f"{device_mb}MiB"}
    return memory | ({} if cpu_mb is None else {"cpu": f"{cpu_mb}MiB"})


def load_native_offloaded(checkpoint_dir, device: torch.device, dtype: torch.dtype, max_memory: dict | None,
                          offload_folder) -> tuple:
    """The text model as a user with too little memory runs it: accelerate's device_map="auto" places
    what fits in `max_memory` on the device, then the CPU, and offloads the rest to disk under
    offload_folder. Returns (model, placement: device -> number of modules)."""
    layout, _ = detect_checkpoint(checkpoint_dir)
    cls = getattr(transformers, layout.native_class)
    model = cls.from_pretrained(checkpoint_dir, dtype=dtype, device_map="auto", max_memory=max_memory,
                                offload_folder=str(offload_folder)).eval()
    placement: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {"": str(device)}).values():
        placement[str(where)] = placement.get(str(where), 0) + 1
    return model, placement


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
def native_generate(model, input_ids: list[int], max_new_tokens: int, eos_token_id=None, media: dict | None = None) -> dict:
    """Greedy decoding with transformers' generate(); prefill and decode timed apart. (With offloading,
    model.device is where the inputs go: the first module's device.) media: the prompt's audio and image
    inputs as the thinker takes them (MediaPrompt.native_kwargs); its towers run inside the prefill."""
    device = model.device
    ids = torch.tensor([input_ids], device=device)
    media = {k: v.to(device) for k, v in (media or {}).items()}
    clock = _FirstTokenClock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id, streamer=clock, **media)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    new = out[0, len(input_ids):].tolist()
    prefill = clock.first_token_at - start
    decode = end - clock.first_token_at
    return {"output_ids": new, "prefill_s": prefill, "decode_s": decode,
            "tok_s": (len(new) - 1) / decode if len(new) > 1 and decode > 0 else 0.0}


@torch.inference_mode()
def native_teacher_forced_logits(model, prompt_ids: list[int], continuation_ids: list[int],
                                 media: dict | None = None) -> torch.Tensor:
    """[n, V] float32 logits predicting each continuation token: one forward pass; with media, the prompt
    (and its audio and images) and then the continuation over its KV cache, as generate() runs them: a
    continuation may hold a placeholder id (a random model can generate one), which one pass would count
    as another image or audio token."""
    ids = torch.tensor([list(prompt_ids) + list(continuation_ids)], device=model.device)
    if not media:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        return logits[len(prompt_ids) - 1: -1].float().cpu()
    media = {k: v.to(model.device) for k, v in media.items()}
    p = len(prompt_ids)
    first = model(input_ids=ids[:, :p], attention_mask=torch.ones_like(ids[:, :p]), use_cache=True, **media)
    parts = [first.logits[0, -1:]]
    if len(continuation_ids) > 1:
        # no attention mask: transformers then places the continuation at cache length + the prompt's rope
        # delta, as its decode steps are (with a mask it would number positions from the mask's start)
        rest = model(input_ids=ids[:, p:-1], past_key_values=first.past_key_values, use_cache=True)
        parts.append(rest.logits[0])
    return torch.cat(parts).float().cpu()
