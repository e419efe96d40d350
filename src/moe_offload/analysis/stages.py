"""Where the time went: Snakemake's benchmark files (one TSV per job, under results/benchmarks/<rule>/),
summed per rule."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import InputError


def read_benchmarks(paths: list[str]) -> pd.DataFrame:
    """One row per job: its rule (the file's folder), the job (the file's name: layer_3, depth_8, ...),
    seconds and max RSS in MiB (NaN where Snakemake wrote NA: the job ended before its first memory
    sample)."""
    rows = []
    for path in map(Path, paths):
        table = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
        if table.empty or not {"s", "max_rss"} <= set(table.columns):
            raise InputError(f"{path} is not a Snakemake benchmark file (no s and max_rss columns)")
        # a `repeat(...)` benchmark has one line per repetition: the job's time is their mean
        rows.append({"rule": path.parent.name, "job": path.stem, "s": table["s"].mean(),
                     "max_rss": table["max_rss"].max()})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "max_rss"])


def stage_times(paths: list[str]) -> list[dict]:
    """Per rule: its jobs, their seconds summed, the largest max RSS (None if no job was sampled); the
    slowest stage first."""
    jobs = read_benchmarks(paths)
    table = jobs.groupby("rule").agg(jobs=("s", "size"), seconds=("s", "sum"), max_rss_mib=("max_rss", "max"))
    table = table.sort_values("seconds", ascending=False)
    return [{"rule": rule, "jobs": int(row.jobs), "seconds": float(row.seconds),
             "max_rss_mib": None if pd.isna(row.max_rss_mib) else float(row.max_rss_mib)}
            for rule, row in table.iterrows()]
