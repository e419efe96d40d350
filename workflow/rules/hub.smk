if config["model"]["source"] == "hf":

    # The hub's config and index, kept under results/ so that planning (also on a cluster's compute
    # nodes) reads them from disk: the only place they are fetched. A local rule (the internet is where
    # Snakemake runs); `--forcerun hub_metadata` refreshes them.
    rule hub_metadata:
        output:
            multiext(
                str(HUB_METADATA_DIR) + "/",
                "config.json",
                "model.safetensors.index.json",
            ),
        log:
            "logs/hub_metadata.log",
        benchmark:
            "results/benchmarks/hub_metadata/hub_metadata.tsv"
        localrule: True
        params:
            model=model_source(),
            code=code_version("hub_metadata"),
        script:
            "../scripts/hub_metadata.py"


# Until the hub's metadata is stored there is no plan: every target but hub_metadata (this rule's
# files; the default target in the Snakefile) stops with one line while the DAG is built, so also in a
# dry run.
if HUB_MISSING:

    rule metadata_first:
        input:
            metadata_first,
        output:
            "{target}",
        wildcard_constraints:
            target=r"(?!results/model/hub/).*",
