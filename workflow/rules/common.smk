import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from moe_offload.config import canonical, check_config
from moe_offload.errors import InputError, config_error_line
from moe_offload.checkpoint.source import EMBEDDED_DIR, planned_text_config

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as err:
    sys.exit(config_error_line(err))

try:
    LAYOUT, TEXT = planned_text_config(config["model"])
    check_config(config, TEXT)
except InputError as err:
    sys.exit(f"error: {err}")

EXPERT_LAYERS = TEXT.expert_layers
LAYER_BYTES = TEXT.num_experts * TEXT.expert_bytes
EXTRACT_MEM_MB = int(
    config["resources"]["extract_mem_factor"] * LAYER_BYTES / 2**20
    + config["resources"]["base_mem_mb"]
)

# transformers' native model holds every expert: about 2.5x its bf16 size in float32 on CPU
NATIVE_MEM_MB = int(
    2.5
    * (len(EXPERT_LAYERS) * LAYER_BYTES + 2 * TEXT.vocab_size * TEXT.hidden_size * 2)
    / 2**20
    + config["resources"]["base_mem_mb"]
)


def model_source():
    """Only the settings of the active source, so that editing another source's settings reruns nothing."""
    model = config["model"]
    keys = {
        "embedded": [],
        "synthetic": ["synthetic"],
        "local": ["path"],
        "hf": ["repo_id", "revision", "cache_dir"],
    }[model["source"]]
    return canonical({"source": model["source"], **{key: model[key] for key in keys}})


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
