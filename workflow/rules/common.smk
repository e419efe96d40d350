import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from moe_offload.errors import InputError, config_error_line
from moe_offload.source import planned_text_config

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as err:
    sys.exit(config_error_line(err))

try:
    LAYOUT, TEXT = planned_text_config(config["model"])
except InputError as err:
    sys.exit(f"error: {err}")

EXPERT_LAYERS = TEXT.expert_layers
LAYER_BYTES = TEXT.num_experts * TEXT.expert_bytes
EXTRACT_MEM_MB = int(
    config["resources"]["extract_mem_factor"] * LAYER_BYTES / 2**20
    + config["resources"]["base_mem_mb"]
)


def model_source():
    """Only the settings of the active source, so that editing another source's settings reruns nothing."""
    model = config["model"]
    keys = {
        "synthetic": ["synthetic"],
        "local": ["path"],
        "hf": ["repo_id", "revision", "cache_dir"],
    }[model["source"]]
    return {"source": model["source"], **{key: model[key] for key in keys}}


def layer_checksums(wildcards):
    return expand("results/checksums/layer_{layer}.json", layer=EXPERT_LAYERS)
