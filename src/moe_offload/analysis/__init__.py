"""Analysis stage: generation runs, cache simulation and profile, comparison, plots."""
