"""`sd3 data run`: materialize every asset for every partition through Dagster, stage by stage.

Dagster runs target one partition each, so a stage is one run per partition, up to `concurrency` runs
at a time. A shard's stage that is up to date (orchestration/freshness.py) is skipped, so a run that
failed or was stopped continues where it was, and a grown URL list costs only its new shards; `force`
runs stages regardless. The global assets (url_shards, content_hashes, bucket_index) always run: they are
cheap, and they are what notices new shards. A run executes its steps in the worker that launched it,
except captioning (see ``orchestration.definitions``). Runs are launched from worker processes, not
threads: Dagster's run setup reconfigures Python logging and deadlocks against a concurrent run in the
same process. Every run lands in the instance under DAGSTER_HOME, so `dagster dev` on the same home
shows the lineage and metadata of what this command did.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg

from assets.pipeline import SHARD_STAGES
from etl.config import PipelineConfig
from etl.layout import DataLayout
from etl.report import PipelineReport, pipeline_report
from orchestration import partitions
from orchestration.definitions import CONFIG_ENV, STAGE_JOBS, build_definitions
from orchestration.freshness import Freshness
from orchestration.lifetime import end_with_parent, parent_gone
from orchestration.orphans import end_orphaned_runs, executor_tags


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


def execute_partition(job_name: str, tags: dict[str, str]) -> list[str]:
    """One Dagster run of a stage job (in a pool worker); returns its failure messages (empty: success)."""
    end_with_parent()  # a killed `sd3 data run` stops its runs, rather than leave them captioning for hours
    job = dg.build_reconstructable_job("orchestration.definitions", "stage_job", (job_name,))
    try:
        with dg.DagsterInstance.get() as instance:
            # Step events still reach the instance (and the UI); the console only hears about problems.
            quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
            result = dg.execute_job(job, instance, run_config=quiet,
                                    tags={**tags, **executor_tags()})
            return [] if result.success else _failure_messages(result)
    finally:
        if parent_gone():  # the run was interrupted and has recorded its failure; no one waits for this worker
            os._exit(1)


def run_pipeline(config_path: str | Path, log=print, force: bool | Collection[str] = False) -> PipelineReport:
    """Materialize every stage for every partition that is not up to date, in the Dagster instance under
    DAGSTER_HOME. ``force``: True, or the names of the assets to materialize for every partition."""
    config_path = str(Path(config_path).resolve())
    config = PipelineConfig.from_yaml(config_path)
    # Pool workers and captioning's step processes rebuild the definitions from this variable.
    os.environ[CONFIG_ENV] = config_path
    build_definitions(config_path)
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.set_concurrency_slots("recaption", recaption_pool_limit(config))
        orphaned = end_orphaned_runs(instance)
        if orphaned:
            log(f"marked {len(orphaned)} run(s) whose process is gone as failed, freeing their slots")
    layout = DataLayout(config.root)

    stages = [name for _, name, _ in STAGE_JOBS]
    forced = set(stages) if force is True else set(force or ())
    if forced - set(stages):
        raise ValueError(f"force: no stage named {sorted(forced - set(stages))} (the stages: {', '.join(stages)})")
    context = multiprocessing.get_context("spawn")
    with (dg.DagsterInstance.get() as instance,
          ProcessPoolExecutor(max_workers=max(1, config.concurrency), mp_context=context) as pool):
        freshness = Freshness(instance, config)
        for job_name, asset, kind in STAGE_JOBS:
            keys = _partition_keys(kind, config, layout)
            if asset in SHARD_STAGES and asset not in forced:
                stale = freshness.to_run(asset, keys)
                log(f"[{job_name}] {asset}: {len(stale)} of {len(keys)} run(s), {len(keys) - len(stale)} up to date")
                keys = stale
            else:
                log(f"[{job_name}] {asset}: {len(keys)} run(s)")
            runs = [(key, pool.submit(execute_partition, job_name, _tags(kind, key, config))) for key in keys]
            failures = [f"partition {key}: {m}" for key, run in runs for m in run.result()]
            if failures:
                raise PipelineError(f"stage {job_name} failed:\n  " + "\n  ".join(failures))

    report = pipeline_report(layout, config.buckets.resolutions)
    if not report.balanced:
        raise PipelineError("the books do not balance:\n" + report.table())
    return report
