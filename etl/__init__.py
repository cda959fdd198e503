"""Pure data functions of the pipeline: tables in, tables (plus counts per outcome) out. No Dagster here."""
