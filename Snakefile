import sys

from snakemake.utils import min_version

from moe_offload import cluster

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config/config.yaml"


include: "workflow/rules/config.smk"
include: "workflow/rules/hub.smk"


# A Slurm run's failures in one line each (the plugin's own report cannot say why a job failed, nor which
# rule of a group job did): printed above Snakemake's closing lines.
onerror:
    for line in cluster.failure_lines(log):
        print(line, file=sys.stderr)


# With the hub's metadata not yet stored (hub.smk), hub_metadata is the only job there is.
if HUB_MISSING:

    rule all:
        default_target: True
        input:
            metadata_first,

else:

    include: "workflow/rules/common.smk"
    include: "workflow/rules/download.smk"
    include: "workflow/rules/extract.smk"
    include: "workflow/rules/validate.smk"
    include: "workflow/rules/quantize.smk"
    include: "workflow/rules/generate.smk"
    include: "workflow/rules/profile.smk"
    include: "workflow/rules/compare.smk"

    rule all:
        default_target: True
        input:
            "results/compare.json",
