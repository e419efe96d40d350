"""transformers' native model as the workflow records it, in two jobs:

- the reference: greedy tokens and teacher-forced logits, what the depth runs' fidelity needs. It runs
  the way a user with too little memory would: accelerate places what fits in a memory budget and
  offloads the rest to disk, so a machine that cannot hold the model still completes the main job;
- the timing: the whole model loaded the ordinary way and timed alone, with a chosen experts
  implementation; optional (native.timing), since it needs the model's full size in memory.

Both write the same JSON shape as a depth run (runs.py): prompts, load_s, decode and prefill tok/s next
to their bounds, memory and its bound, device, threads and the machine's load.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

import psutil

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ..atomic import atomic_path, write_json
from ..checkpoint.layouts import detect_checkpoint
from ..resources import kv_bytes
from ..runtime.memory import MemoryMeter
from ..runtime.native import (load_native, load_native_offloaded, native_generate, native_teacher_forced_logits,
                              offload_memory_map)
from .run_info import (check_finite, decode_rate, device_of, encode_prompt, environment, prefill_rate, probe,
                       speed_bound)


log = logging.getLogger(__name__)
OFFLOAD_PREFIX = ".offload."


def offload_folder(offload_dir) -> Path:
    """This process's disk offload folder, named by host and pid so that a later run can tell whether the
    process that made it still lives: .offload.<host>.<pid>."""
    return Path(offload_dir) / f"{OFFLOAD_PREFIX}{socket.gethostname()}.{os.getpid()}"


def remove_stale_offload(offload_dir) -> list[Path]:
    """Remove the offload folders that a killed run left (gigabytes on a memory-limited run): those of this
    host whose process is gone, or whose pid now belongs to a process younger than the folder. A folder
    of another host is kept (its process cannot be checked from here), as is one without host and pid in
    its name; both are logged. Returns the folders removed."""
    removed = []
    for folder in sorted(Path(offload_dir).glob(f"{OFFLOAD_PREFIX}*")):
        host, _, pid = folder.name[len(OFFLOAD_PREFIX):].rpartition(".")
        if not host or not pid.isdigit():
            log.warning("left %s: its name does not say which process made it (remove it by hand if no "
                        "native reference runs)", folder)
            continue
        if host != socket.gethostname():
            log.warning("left %s: made on host %s, whose processes cannot be checked from here", folder, host)
            continue
        if _owner_alive(int(pid), folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by a native reference run that no longer runs", folder)
        removed.append(folder)
    return removed


def _owner_alive(pid: int, folder: Path) -> bool:
    """Whether process pid may still be the one that made folder: it exists, is not this process (which
    has not made its folder yet), and started before the folder last changed (else the pid was reused)."""
    if pid == os.getpid():
        return False
    try:
        started = psutil.Process(pid).create_time()
        changed = folder.stat().st_mtime
    except (psutil.NoSuchProcess, FileNotFoundError):
        return False
    except psutil.Error:  # exists, but cannot be inspected (another user's): assume it is the owner
        return True
    return started <= changed + 1  # create_time is rounded; a second of slack keeps a live owner


def _generate_all(model, tok, prompts: list, max_new_tokens: int, progress, chat_template,
                  checkpoint_dir) -> tuple[list[dict], list[dict]]:
    """Each prompt generated greedily; returns the runs and each one's media inputs (audio and images as
    the thinker takes them; {} for text)."""
    from ..runtime.media import MediaProcessor

    runs, media, processor = [], [], None
    for prompt in prompts:
        if isinstance(prompt, dict):  # text with audio and images, through the checkpoint's own processor
            processor = processor or MediaProcessor(checkpoint_dir, tok)
            m = processor(prompt["text"], prompt["audio"], prompt["image"], chat_template)
            ids, inputs, kind = m.input_ids, m.native_kwargs(), m.kind
        else:
            ids, inputs, kind = encode_prompt(tok, prompt, chat_template), {}, "text"
        run = native_generate(model, ids, max_new_tokens, tok.eos_token_id, inputs)
        runs.append({"prompt": prompt, "kind": kind, "input_ids": ids, **run,
                     "text": tok.decode(run["output_ids"], skip_special_tokens=True)})
        media.append(inputs)
        if progress is not None:
            progress.update(1)
    return runs, media


def _result(kind: str, model, device, dtype, cfg, runs, load_s, meter, max_new_tokens, held_bytes: int,
            experts_implementation: str | None, probes: dict) -> dict:
    seq = max(len(r["input_ids"]) + max_new_tokens for r in runs)
    kv = kv_bytes(cfg, cfg.num_layers, seq, dtype)
    return {"kind": kind, "model_class": type(model).__name__, **environment(device, dtype),
            "experts_implementation": experts_implementation or "default", "load_s": load_s,
            "tok_s": decode_rate(runs), "prefill_s": sum(r["prefill_s"] for r in runs),
            "prefill_tok_s": prefill_rate(runs), "speed_bound": speed_bound(cfg, cfg.num_layers, dtype, device, runs, probes),
            "probes": probes,
            "memory": meter.report({"weights_bytes": held_bytes, "kv_cache_bytes": kv, "total_bytes": held_bytes + kv}),
            "prompts": runs}


def run_native_reference(checkpoint_dir, prompts: list, max_new_tokens: int, device: str, dtype: str,
                         max_memory_mb: int | None, cpu_memory_mb: int | None, offload_dir, out_json, out_logits,
                         progress=None, chat_template: bool | None = None, start_rss: int | None = None) -> dict:
    """Greedy tokens and teacher-forced logits within a memory budget (max_memory_mb on the device; on
    CUDA cpu_memory_mb of host memory after it), the rest offloaded to a folder under offload_dir
    (offload_folder), removed afterwards, or by the next run where this one is killed."""
    device, torch_dtype = device_of(device), getattr(torch, dtype)
    _, cfg = detect_checkpoint(checkpoint_dir)
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    max_memory = offload_memory_map(device, max_memory_mb, cpu_memory_mb)
    asked = {str(k): v for k, v in (max_memory or {}).items()}  # accelerate rewrites the dict it is given
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_offload(offload_dir)
    folder = offload_folder(offload_dir)
    folder.mkdir()
    try:
        meter = MemoryMeter(device, start_rss)
        start = time.perf_counter()
        model, placement = load_native_offloaded(checkpoint_dir, device, torch_dtype, max_memory, folder)
        load_s = time.perf_counter() - start
        meter.end_phase("load")
        runs, media = _generate_all(model, tok, prompts, max_new_tokens, progress, chat_template, checkpoint_dir)
        meter.end_phase("generate")
        probes = probe(device, torch_dtype)  # after the timed generation and its memory peak
        logits = {f"prompt_{i}": native_teacher_forced_logits(model, r["input_ids"], r["output_ids"], m).contiguous()
                  for i, (r, m) in enumerate(zip(runs, media))}
        for i, value in enumerate(logits.values()):
            check_finite(value, f"native, prompt {i}")
        # what stayed in memory: parameters not on the meta device (offloaded ones are placeholders there)
        held = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
        offloaded = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
        result = _result("native_reference", model, device, torch_dtype, cfg, runs, load_s, meter, max_new_tokens,
                         held, None, probes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with atomic_path(out_logits) as tmp:
        save_file(logits, tmp)
    result["offload"] = {"max_memory": asked, "placement": placement,
                         "held_bytes": held, "offloaded_to_disk_bytes": offloaded}
    write_json(out_json, result)
    return result


def run_native_timing(checkpoint_dir, prompts: list, max_new_tokens: int, device: str, dtype: str,
                      out_json, experts_implementation: str | None = None, progress=None,
                      chat_template: bool | None = None, start_rss: int | None = None) -> dict:
    """Decode speed, load time and memory of the whole model loaded the ordinary way."""
    device, torch_dtype = device_of(device), getattr(torch, dtype)
    _, cfg = detect_checkpoint(checkpoint_dir)
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    meter = MemoryMeter(device, start_rss)
    start = time.perf_counter()
    model = load_native(checkpoint_dir, device, torch_dtype, experts_implementation)
    load_s = time.perf_counter() - start
    meter.end_phase("load")
    runs, _ = _generate_all(model, tok, prompts, max_new_tokens, progress, chat_template, checkpoint_dir)
    meter.end_phase("generate")
    probes = probe(device, torch_dtype)  # after the timed generation and its memory peak
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result = _result("native", model, device, torch_dtype, cfg, runs, load_s, meter, max_new_tokens, weights,
                     experts_implementation, probes)
    write_json(out_json, result)
    return result
