from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/compare.smk"


rule all:
    default_target: True
    input:
        "results/compare.json",
