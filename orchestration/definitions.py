"""Everything Dagster needs, assembled in one place: assets, checks, jobs, resources, executor.

The pipeline config file is named by SD3_PIPELINE_CONFIG (default: the demo config), because the
partitions (which resolutions exist) and every asset's paths come from it.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import dagster as dg

from assets.pipeline import build_pipeline_assets
from etl.config import PipelineConfig
from orchestration.automation import build_automation
from orchestration.lineage import CHECKPOINT
from orchestration.resources import PipelineResource

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.yaml"
CONFIG_ENV = "SD3_PIPELINE_CONFIG"

# One job per stage, in the order `sd3 data run` launches them (each stage waits for the last). A stage
# job holds one asset, so `sd3 data run` can skip each shard's stages one by one (orchestration/freshness.py).
STAGE_JOBS = (
    ("url_shards_job", "url_shards", None),
    ("download_job", "downloaded", "shard"),
    ("hashes_job", "content_hashes", None),
    ("filter_job", "filtered", "shard"),
    ("recaption_job", "recaptioned", "shard"),
    ("bucket_job", "bucketed", "shard_resolution"),
    ("index_job", "bucket_index", "resolution"),
)


def config_path() -> str:
    return os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG))


@cache
def build_definitions(path: str) -> dg.Definitions:
    config = PipelineConfig.from_yaml(path)
    assets = build_pipeline_assets(config)
    # A stage job runs one asset for one partition, so a run has nothing to parallelize: in-process execution
    # saves a Python + dagster start per step (the demo pipeline: 54 s -> 39 s). Runs stay separate
    # processes (`sd3 data run`'s pool, the daemon's run launcher) and pools still apply. Captioning keeps a
    # process per step: it is where models are loaded, and a step's exit is what frees their GPU memory
    # before the next shard's run lands in the same worker.
    isolated = dg.multiprocess_executor.configured({"max_concurrent": 1})
    jobs = {name: dg.define_asset_job(name, selection=dg.AssetSelection.assets(asset),
                                      executor_def=isolated if asset == "recaptioned" else None)
            for name, asset, _ in STAGE_JOBS}
    sensors, schedules = build_automation(config, jobs)
    return dg.Definitions(
        assets=[*assets, CHECKPOINT],
        jobs=list(jobs.values()),
        sensors=sensors,
        schedules=schedules,
        resources={"pipeline": PipelineResource(config_path=str(Path(path).resolve()))},
        executor=dg.in_process_executor,
    )


def stage_job(name: str) -> dg.JobDefinition:
    """Reconstructs a stage job in any process (`sd3 data run`'s pool workers call this)."""
    return build_definitions(config_path()).resolve_job_def(name)


defs = build_definitions(config_path())
