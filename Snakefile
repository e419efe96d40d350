from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config/config.yaml"


include: "workflow/rules/config.smk"
include: "workflow/rules/hub.smk"


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
