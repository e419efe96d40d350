import os
import sys

import psutil

from moe_offload import resources as res
from moe_offload.disk import check_disk
from moe_offload.code_version import code_version
from moe_offload.config import canonical, check_config
from moe_offload.errors import InputError
from moe_offload.checkpoint.source import EMBEDDED_DIR, planned_text_config

try:
    LAYOUT, TEXT = planned_text_config(config["model"])
    check_config(config, TEXT)
except InputError as err:
    sys.exit(f"error: {err}")

EXPERT_LAYERS = TEXT.expert_layers
BASE_MB = config["resources"]["base_mem_mb"]
LAYER_BYTES = TEXT.num_experts * TEXT.expert_bytes
DENSE_BYTES = res.extract_bytes(TEXT)["dense_bytes"]
EXTRACT_MEM_MB = res.to_mb(
    int(config["resources"]["extract_mem_factor"] * LAYER_BYTES), BASE_MB
)

_DISK_CHECKED = []


def extract_needs(mem_mb):
    """mem_mb of an extraction job. The first one evaluated (planning evaluates them all before any job
    starts) checks the free disk for every extraction the run plans."""
    if workflow.is_main_process and not _DISK_CHECKED:
        _DISK_CHECKED.append(True)
        sizes = {"extract_layer": LAYER_BYTES, "extract_dense": DENSE_BYTES}
        writes = sum(sizes.get(job.rule.name, 0) for job in workflow.dag.needrun_jobs())
        headroom = config["resources"]["disk_headroom_mb"] * 2**20
        what = f"the extracted experts ({writes / 1e9:.1f} GB) plus resources.disk_headroom_mb"
        try:
            check_disk("results", writes + headroom, what)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
    return mem_mb


# The default profile bounds memory by the machine's, detected here unless given (--resources mem_mb=...).
# Only for local runs: on a cluster each job gets its own node's memory.
MACHINE_MB = psutil.virtual_memory().total // 2**20
if workflow.local_exec and "mem_mb" not in workflow.global_resources:
    workflow.register_resource("mem_mb", MACHINE_MB)

# Jobs whose speed the report compares take every core, so no other job runs beside them (each job
# holds at least one core); they set torch to these threads.
TIMED_THREADS = workflow.cores if isinstance(workflow.cores, int) else 1


def model_files():
    """The embedded checkpoint's files as inputs, so that a retrained default reruns everything."""
    if config["model"]["source"] != "embedded":
        return []
    return sorted(str(p) for p in EMBEDDED_DIR.iterdir() if p.is_file())


def layer_checksums(wildcards):
    return expand("results/checksums/layer_{layer}.json", layer=EXPERT_LAYERS)


# Depths past the model are dropped; the full depth is always run (it is the parity check).
DEPTHS = sorted(
    {d for d in config["generate"]["depths"] if d <= TEXT.num_layers}
    | {TEXT.num_layers}
)
FULL_DEPTH = TEXT.num_layers


def generate_params():
    """Plain values (not functions of input), so Snakemake's params trigger tracks them."""
    return canonical(
        {key: config["generate"][key] for key in ("max_new_tokens", "device", "dtype")}
    )


def depth_layers(wildcards):
    """A depth-N run needs layers 0..N-1 extracted and validated, nothing more."""
    layers = [layer for layer in EXPERT_LAYERS if layer < int(wildcards.depth)]
    return {
        "layers": expand("results/experts/layer_{layer}.safetensors", layer=layers),
        "checksums": expand("results/checksums/layer_{layer}.json", layer=layers),
    }


def gpu_count():
    return 1 if config["generate"]["device"].startswith("cuda") else 0


def native_json():
    """What the report compares against: the timing run, or the reference run's own figures without it."""
    if config["native"]["timing"]:
        return "results/generate/native_timing.json"
    return "results/generate/native_reference.json"


# Memory each generation job declares, from the model, the device and the dtype (moe_offload.resources).
DTYPE = config["generate"]["dtype"]
ON_GPU = config["generate"]["device"].startswith("cuda")
# a byte-level tokenizer makes at most one token per byte: a bound on prompt plus new tokens
SEQ_LEN = (
    max(len(p.encode()) for p in config["generate"]["prompts"])
    + config["generate"]["max_new_tokens"]
)


def native_budget():
    return {key: config["native"][key] for key in ("max_memory_mb", "cpu_memory_mb")}


# The GPU's memory bounds the GPU jobs of a local run as the machine's bounds mem_mb (unless given:
# --resources gpu_mem_mb=N), asked of nvidia-smi so that planning never initialises CUDA; one GPU job
# at a time unless --resources gpu=N says otherwise (jobs do not pick a GPU of their own).
if workflow.local_exec and workflow.is_main_process and ON_GPU:
    if "gpu_mem_mb" not in workflow.global_resources:
        GPU_MB = res.gpu_memory_mb(config["generate"]["device"])
        if GPU_MB is None:
            print(
                f"warning: generate.device is {config['generate']['device']}, but nvidia-smi reports no such "
                "GPU here (or not its memory): the GPU jobs' memory is not checked",
                file=sys.stderr,
            )
        else:
            workflow.register_resource("gpu_mem_mb", GPU_MB)
    if "gpu" not in workflow.global_resources:
        workflow.register_resource("gpu", 1)


def _checked(job, needs, hint):
    """Stop the run up front (while planning, before any job starts) with one line if a job needs more
    than the bound in force (the machine's or GPU's memory, or --resources)."""
    if workflow.is_main_process:
        for name, need_mb in needs.items():
            have = workflow.global_resources.get(name)
            have_mb = getattr(have, "value", have)
            if name == "mem_mb":
                have_mb = have_mb or MACHINE_MB
            what, holder = (
                ("memory", "the machine")
                if name == "mem_mb"
                else ("GPU memory", f"the GPU ({config['generate']['device']})")
            )
            line = (
                res.fits_line(job, need_mb, have_mb, hint, what, holder)
                if have_mb
                else None
            )
            if line:
                # printed before exiting: Snakemake wraps the exit of a resource function in its own report
                print(line, file=sys.stderr)
                sys.exit(1)
    return needs


def _needs(host_bytes, device_bytes):
    """mem_mb for the host (plus a process's base), and on a GPU gpu_mem_mb for what lives there."""
    needs = {"mem_mb": res.to_mb(host_bytes, BASE_MB)}
    if ON_GPU:
        needs["gpu_mem_mb"] = res.to_mb(device_bytes)
    return needs


def native_reference_needs():
    """The bytes it holds at its dtype within its budget; the rest is on disk."""
    budget_mb = config["native"]["max_memory_mb"]
    if budget_mb is None and not ON_GPU:
        budget_mb = int(0.9 * MACHINE_MB)
    held = res.native_bytes(
        TEXT, DTYPE, SEQ_LEN, None if budget_mb is None else budget_mb * 2**20
    )
    host = held["total_bytes"]
    if ON_GPU:  # the host tier after the GPU's budget
        host = min(
            held["weights_bytes"], (config["native"]["cpu_memory_mb"] or 0) * 2**20
        )
    return _checked(
        "generate_native_reference",
        _needs(host, held["total_bytes"]),
        "lower native.max_memory_mb (the rest is offloaded to disk)",
    )


def native_timing_needs():
    """The whole model; loaded on the host first, also when it then moves to a GPU."""
    whole = res.native_bytes(TEXT, DTYPE, SEQ_LEN)["total_bytes"]
    return _checked(
        "generate_native_timing",
        _needs(whole, whole),
        "set native.timing: false (the reference run offloads and still completes)",
    )


def depth_needs(depth):
    """dense + capacity x expert + KV (+ pinned host staging on a GPU); unified memory: every expert, in
    host RAM."""
    cache = config["cache"]
    unified = cache["unified_memory"]
    need = res.depth_bytes(
        TEXT,
        depth,
        cache["capacity"],
        cache["scope"],
        DTYPE,
        SEQ_LEN,
        pinned_staging=ON_GPU and cache["pin_memory"] and not unified,
        unified=unified,
    )
    host, device = need["total_bytes"], need["total_bytes"]
    if ON_GPU:  # the dense file passes through the host; the staging buffers stay there
        host = need["dense_bytes"] + need["host_staging_bytes"]
        if unified:  # the GPU reads the experts in host RAM
            host += need["expert_cache_bytes"]
            device -= need["expert_cache_bytes"]
    return _checked(
        f"generate_depth (depth {depth})",
        _needs(host, device),
        "set cache.unified_memory: false" if unified else "lower cache.capacity",
    )


onstart:
    # Snakemake evaluates a job's resources only when it is about to start; evaluating them all now
    # makes a job that cannot fit (memory, disk) stop the run before the first job starts.
    for job in workflow.dag.needrun_jobs():
        job.resources
