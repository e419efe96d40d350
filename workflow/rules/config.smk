import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from moe_offload.code_version import code_version
from moe_offload.config import (
    canonical,
    check_integers,
    heldout_path,
    media_files,
    prompt_texts,
    prompts_folder,
)
from moe_offload.errors import InputError, config_error_line
from moe_offload.checkpoint.hub import hub_metadata_dir, missing_metadata

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as err:
    sys.exit(config_error_line(err))
try:
    check_integers(
        config,
        yaml.safe_load(
            open(workflow.source_path("../schemas/config.schema.yaml")).read()
        ),
    )
    # The prompts' text from here on, files read: the native jobs' params hold it by value, so editing a
    # prompt file reruns them (and the depths, which read their prompts from the native reference), and
    # the plan sizes memory by it.
    config["generate"]["prompts"] = prompt_texts(
        config["generate"]["prompts"],
        prompts_folder(workflow.configfiles, workflow.overwrite_configfiles or []),
    )
    HELDOUT = heldout_path(
        config["fidelity"]["heldout"],
        prompts_folder(
            workflow.configfiles,
            workflow.overwrite_configfiles or [],
            section="fidelity",
            key="heldout",
        ),
    )
    MEDIA_FILES = media_files(config["generate"]["prompts"])
    HUB_METADATA_DIR = (
        hub_metadata_dir(config["model"]) if config["model"]["source"] == "hf" else None
    )
except InputError as err:
    sys.exit(f"error: {err}")
# For a hub source whose config and index are not stored yet: the line saying to fetch them first (the
# plan is made from them, and planning itself never reaches the hub).
HUB_MISSING = missing_metadata(config["model"])


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


def metadata_first(wildcards):
    """The input of every target while the hub's metadata is missing: stops the run with one line."""
    print(f"error: {HUB_MISSING}", file=sys.stderr)
    sys.exit(1)
