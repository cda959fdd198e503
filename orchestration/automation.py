"""What runs without anyone asking: a sensor for new URL lists and a schedule that backfills recaptioning.

Under `dagster dev` (or `dagster-daemon run`) the daemon evaluates these and launches the runs they
request; tests evaluate them in-process on the same instance.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from etl.config import PipelineConfig
from etl.layout import DataLayout
from orchestration import partitions
from orchestration.resources import PipelineResource


def url_list_fingerprints(config: PipelineConfig) -> dict[str, list[int]]:
    return {
        str(s.path): [s.path.stat().st_mtime_ns, s.path.stat().st_size]
        for s in config.all_sources()
        if s.path.exists()
    }


def shards_to_download(instance: dg.DagsterInstance) -> list[str]:
    registered = instance.get_dynamic_partitions(partitions.shards.name)
    done = instance.get_materialized_partitions(dg.AssetKey("downloaded"))
    return [s for s in registered if s not in done]


def shards_to_recaption(layout: DataLayout) -> list[tuple[str, int]]:
    """Shards whose filtered output exists but whose recaptioned output is missing or older than it."""
    stale = []
    for shard in layout.shards():
        filtered, recaptioned = layout.filtered(shard), layout.recaptioned(shard)
        if not filtered.exists():
            continue
        filtered_at = filtered.stat().st_mtime_ns
        if not recaptioned.exists() or recaptioned.stat().st_mtime_ns < filtered_at:
            stale.append((shard, filtered_at))
    return stale


def build_automation(config: PipelineConfig, jobs: dict[str, dg.UnresolvedAssetJobDefinition]
                     ) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    @dg.sensor(jobs=[jobs["url_shards_job"], jobs["download_job"]],
               minimum_interval_seconds=config.automation.sensor_interval_s,
               description="Splits new or grown URL lists into shards, then downloads shards not yet downloaded.")
    def url_lists_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource):
        fingerprints = url_list_fingerprints(pipeline.config)
        previous = json.loads(context.cursor) if context.cursor else {}
        requests = []
        if fingerprints != previous:
            digest = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
            requests.append(dg.RunRequest(job_name="url_shards_job", run_key=f"url-lists-{digest}"))
        for shard in shards_to_download(context.instance):
            requests.append(dg.RunRequest(job_name="download_job", partition_key=shard, run_key=f"download-{shard}"))
        if not requests:
            return dg.SkipReason("no new URL lists and every registered shard is downloaded")
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(fingerprints, sort_keys=True))

    @dg.schedule(cron_schedule=config.automation.recaption_cron, job=jobs["recaption_job"],
                 description="Recaptions shards whose filtered output is newer than their captions.")
    def recaption_backfill(context: dg.ScheduleEvaluationContext, pipeline: PipelineResource):
        stale = shards_to_recaption(pipeline.layout)
        if not stale:
            return dg.SkipReason("every filtered shard is recaptioned")
        return [dg.RunRequest(partition_key=shard, run_key=f"recaption-{shard}-{stamp}") for shard, stamp in stale]

    return [url_lists_sensor], [recaption_backfill]
