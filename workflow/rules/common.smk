import os
import sys

from moe_offload.disk import existing_parent, free_bytes
from moe_offload.plan import Plan, detect_machine, stated_machine
from moe_offload.code_version import code_version
from moe_offload.config import canonical, check_config, quant_scheme
from moe_offload.errors import InputError
from moe_offload.checkpoint.source import (
    EMBEDDED_DIR,
    planned_text_config,
    planned_thinker,
)
from moe_offload.resources import tower_params

try:
    LAYOUT, TEXT = planned_text_config(config["model"])
    check_config(config, TEXT)
    TOWER_PARAMS = tower_params(planned_thinker(config["model"]))
except InputError as err:
    sys.exit(f"error: {err}")

EXPERT_LAYERS = TEXT.expert_layers
if MEDIA_FILES and not LAYOUT.towers:
    sys.exit(
        f"error: generate.prompts hold audio or images, but the model's layout ({LAYOUT.name}) has no audio "
        "or vision tower: media prompts need a Qwen3-Omni thinker"
    )
ON_GPU = config["generate"]["device"].startswith("cuda")


# The one block that reads Snakemake's state: the machine the plan is made for, the bounds a local run
# registers, and the check of the jobs that will run. Everything else is moe_offload.plan, a pure
# function of (config, TEXT, MACHINE). A cluster profile states its nodes (config node_mem_mb,
# node_gpu_mem_mb): then nothing of the machine Snakemake runs on (a login node) is read or registered.
MACHINE = stated_machine(config) or detect_machine(
    config["generate"]["device"],
    {
        name: getattr(value, "value", value)
        for name, value in workflow.global_resources.items()
        if name in ("mem_mb", "gpu_mem_mb")
    },
    ask_gpu=workflow.is_main_process,
)
PLAN = Plan(config, TEXT, MACHINE, TOWER_PARAMS)
for name, value in PLAN.global_resources().items():
    if name not in workflow.global_resources:
        workflow.register_resource(name, value)
if workflow.is_main_process:
    for line in PLAN.warnings():
        print(line, file=sys.stderr)


def refuse_unfit():
    """Stop the run, before any job starts, with one line if a job that will run cannot fit the machine
    (or a node) or the extractions cannot fit the disk."""
    jobs = [(job.rule.name, dict(job.wildcards)) for job in workflow.dag.needrun_jobs()]
    line = PLAN.refusal(jobs, free_bytes("results"), str(existing_parent("results")))
    if line:
        print(line, file=sys.stderr)
        sys.exit(1)


_CHECKED = []


def needs(rule, key):
    """A resource of a job, from the plan. A dry run runs no onstart hook: the first resource it asks
    for checks the plan, and a refusal then ends the process itself, as Snakemake wraps whatever a
    resource function raises (SystemExit too) in a many-line report. A dry run holds no lock.
    """

    def resource(wildcards):
        if workflow.is_main_process and workflow.dryrun and not _CHECKED:
            _CHECKED.append(True)
            try:
                refuse_unfit()
            except SystemExit as exit:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exit.code)
        return PLAN.needs(rule, dict(wildcards)).get(key, 0)

    return resource


onstart:
    # a real run: the same check, before the first job starts; the cluster's executor is known here
    if workflow.is_main_process:
        if not workflow.local_exec and not MACHINE.cluster:
            sys.exit(
                "error: the jobs go to a cluster, but its nodes' memory is not stated: set node_mem_mb "
                "(and node_gpu_mem_mb) under config: in the profile (profiles/slurm/config.yaml)"
            )
        refuse_unfit()


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


# quantize.bits 8 or 4: every depth runs again on quantized experts, named by their scheme ("8", "4", or
# "4h8" with precision by popularity); None: 16-bit only
QUANT_SCHEME = quant_scheme(config["quantize"])
SCHEME_PATTERN = r"8|4|4h8"


def hot_choice(wildcards):
    """The hot experts' choice, for a scheme with precision by popularity."""
    return (
        f"results/experts_q{wildcards.scheme}/hot.json"
        if "h" in wildcards.scheme
        else []
    )


def quantized_depth_layers(wildcards):
    """A quantized depth-N run needs layers 0..N-1 quantized (from validated files), nothing more."""
    layers = [layer for layer in EXPERT_LAYERS if layer < int(wildcards.depth)]
    quantized = expand(
        "results/experts_q{scheme}/layer_{layer}.{ext}",
        scheme=wildcards.scheme,
        layer=layers,
        ext=["safetensors", "json"],
    )
    return {"layers": quantized[::2], "checksums": quantized[1::2]}


def depth_runs():
    """Every depth run the report compares: 16-bit, and quantized when config quantize says so."""
    runs = expand("results/generate/depth_{depth}.json", depth=DEPTHS)
    if QUANT_SCHEME:
        runs += expand(
            "results/generate/q{scheme}/depth_{depth}.json",
            scheme=QUANT_SCHEME,
            depth=DEPTHS,
        )
    return runs


def quantize_records():
    """Each quantized layer's record (its errors per expert), for the report."""
    if not QUANT_SCHEME:
        return []
    return expand(
        "results/experts_q{scheme}/layer_{layer}.json",
        scheme=QUANT_SCHEME,
        layer=EXPERT_LAYERS,
    )


def heldout_input():
    """fidelity.heldout's text, scored by the full-depth runs only (a truncated network is not the model)."""

    def heldout(wildcards):
        return [str(HELDOUT)] if HELDOUT and int(wildcards.depth) == FULL_DEPTH else []

    return heldout


def heldout_params():
    """(tokens, window) of fidelity.heldout, as plain values (Snakemake's params trigger tracks them)."""
    heldout = config["fidelity"]["heldout"] or {}
    return [heldout.get("tokens", 2048), heldout.get("window", 256)]


def tower_files(wildcards):
    """Media prompts need the towers extracted and validated (and their files, whose content reruns the
    runs); text-only runs need neither."""
    if not MEDIA_FILES:
        return {}
    return {
        "towers": "results/experts/towers.safetensors",
        "towers_checksum": "results/checksums/towers.json",
        "media": MEDIA_FILES,
    }


def modality_inputs(wildcards):
    """Media prompts: the full depth's prompts, whose token ids say which trace rows are audio or image."""
    return {"depth": f"results/generate/depth_{FULL_DEPTH}.json"} if MEDIA_FILES else {}


def gpu_count():
    return 1 if ON_GPU else 0


def native_json():
    """What the report compares against: the timing run, or the reference run's own figures without it."""
    if config["native"]["timing"]:
        return "results/generate/native_timing.json"
    return "results/generate/native_reference.json"


def native_budget():
    return {key: config["native"][key] for key in ("max_memory_mb", "cpu_memory_mb")}


def stage_benchmarks(wildcards):
    """Snakemake's benchmark file of every job before the report. Snakemake counts a
    job's benchmark file among its outputs: as inputs they order the report after those
    jobs and hold the exact jobs of this run (a glob would also find stale ones, such as
    a depth no longer configured). A missing one reruns its job, so hub_metadata's is
    left out: metadata kept from before would be fetched anew."""
    singles = ["download", "extract_dense", "validate_dense", "validate_all"]
    singles += ["extract_towers", "validate_towers"] if MEDIA_FILES else []
    singles += ["generate_native_reference", "profile_cache", "plots"]
    if config["native"]["timing"]:
        singles.append("generate_native_timing")
    return (
        [str(getattr(rules, name).benchmark) for name in singles]
        + expand(rules.extract_layer.benchmark, layer=EXPERT_LAYERS)
        + expand(rules.validate_layer.benchmark, layer=EXPERT_LAYERS)
        + expand(rules.generate_depth.benchmark, depth=DEPTHS)
        + quantized_benchmarks()
    )


def quantized_benchmarks():
    """The quantization jobs' benchmark files, when config quantize runs them."""
    if not QUANT_SCHEME:
        return []
    files = expand(
        rules.quantize_layer.benchmark, scheme=QUANT_SCHEME, layer=EXPERT_LAYERS
    )
    files += expand(
        rules.generate_depth_quantized.benchmark, scheme=QUANT_SCHEME, depth=DEPTHS
    )
    if "h" in QUANT_SCHEME:
        files += expand(rules.hot_experts.benchmark, scheme=QUANT_SCHEME)
    return files
