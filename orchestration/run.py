"""`sd3 data run`: materialize every asset for every partition through Dagster, stage by stage.

Dagster runs target one partition each, so a stage is one run per partition, up to `concurrency` runs
at a time; each run uses the multiprocess executor. Every run lands in the instance under DAGSTER_HOME,
so `dagster dev` on the same home shows the lineage and metadata of what this command did.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg

from etl.config import PipelineConfig
from etl.layout import DataLayout
from etl.report import PipelineReport, pipeline_report
from orchestration import partitions
from orchestration.definitions import CONFIG_ENV, STAGE_JOBS, build_definitions


class PipelineError(RuntimeError):
    pass


def _failure_messages(result: dg.ExecuteJobResult) -> list[str]:
    """The root cause of each failed step: Dagster wraps it in an 'error occurred while executing' error."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            messages.append(f"{event.step_key}: {error.message.strip()}")
    return messages or [f"run {result.run_id} failed"]


def _partition_keys(kind: str | None, config: PipelineConfig, layout: DataLayout) -> list[str | None]:
    if kind is None:
        return [None]
    if kind == "shard":
        return list(layout.shards())
    if kind == "resolution":
        return [str(r) for r in config.buckets.resolutions]
    return [
        dg.MultiPartitionKey({"shard": s, "resolution": str(r)})
        for s in layout.shards()
        for r in config.buckets.resolutions
    ]


def _tags(kind: str | None, key: str | None, config: PipelineConfig) -> dict[str, str]:
    if key is None:
        return {}
    if kind == "shard":
        return dict(partitions.shards.get_tags_for_partition_key(key))
    if kind == "resolution":
        return dict(partitions.resolutions(config.buckets.resolutions).get_tags_for_partition_key(key))
    return dict(partitions.shard_by_resolution(config.buckets.resolutions).get_tags_for_partition_key(key))


def recaption_pool_limit(config: PipelineConfig) -> int:
    """The recaption step is GPU-bound: by default one at a time per visible GPU (one on CPU)."""
    if config.automation.recaption_pool_limit is not None:
        return config.automation.recaption_pool_limit
    import torch

    return max(1, torch.cuda.device_count())


def run_pipeline(config_path: str | Path, instance: dg.DagsterInstance | None = None,
                 log=print) -> PipelineReport:
    config_path = str(Path(config_path).resolve())
    config = PipelineConfig.from_yaml(config_path)
    # The multiprocess executor's children rebuild the definitions from this variable.
    os.environ[CONFIG_ENV] = config_path
    build_definitions(config_path)
    instance = instance or dg.DagsterInstance.get()
    instance.event_log_storage.set_concurrency_slots("recaption", recaption_pool_limit(config))
    layout = DataLayout(config.root)

    for job_name, asset_keys, kind in STAGE_JOBS:
        keys = _partition_keys(kind, config, layout)
        log(f"[{job_name}] {', '.join(asset_keys)}: {len(keys)} run(s)")
        job = dg.build_reconstructable_job("orchestration.definitions", "stage_job", (job_name,))

        def launch(key):
            with dg.DagsterInstance.from_ref(instance.get_ref()) as run_instance:
                return key, dg.execute_job(job, run_instance, tags=_tags(kind, key, config))

        failures = []
        with ThreadPoolExecutor(max_workers=max(1, config.concurrency)) as pool:
            for key, result in pool.map(launch, keys):
                if not result.success:
                    failures += [f"partition {key}: {m}" for m in _failure_messages(result)]
        if failures:
            raise PipelineError(f"stage {job_name} failed:\n  " + "\n  ".join(failures))

    report = pipeline_report(layout, config.buckets.resolutions)
    if not report.balanced:
        raise PipelineError("the books do not balance:\n" + report.table())
    return report
