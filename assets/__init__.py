"""Software-defined assets: thin Dagster wrappers over etl/."""
