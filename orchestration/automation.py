"""What runs without anyone asking: a sensor for new URL lists and a schedule that backfills recaptioning.

Under `dagster dev` (or `dagster-daemon run`) the daemon evaluates these and launches the runs they
request; tests evaluate them in-process on the same instance.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import dagster as dg

from etl.config import PipelineConfig
from etl.layout import DataLayout
from orchestration import partitions
from orchestration.freshness import Freshness
from orchestration.orphans import UNFINISHED, end_orphaned_runs, launched_here
from orchestration.resources import PipelineResource


def url_list_fingerprints(config: PipelineConfig) -> dict[str, list[int]]:
    return {
        str(s.path): [s.path.stat().st_mtime_ns, s.path.stat().st_size]
        for s in config.all_sources()
        if s.path.exists()
    }


def shards_to_download(instance: dg.DagsterInstance, config: PipelineConfig) -> list[tuple[str, str]]:
    """(shard, its URL rows' version) of the registered shards whose download is not up to date: never
    downloaded, or their URL list grew since (the last shard of a growing list)."""
    return _stale_with(instance, config, "downloaded", instance.get_dynamic_partitions(partitions.shards.name),
                       "urls")


def shards_to_recaption(instance: dg.DagsterInstance, config: PipelineConfig) -> list[tuple[str, str]]:
    """(shard, its filtered rows' version) of the filtered shards whose captions are not up to date, by the
    rule `sd3 data run` skips by (orchestration/freshness.py): a filter rewrite of the same rows is no reason."""
    layout = DataLayout(config.root)
    return _stale_with(instance, config, "recaptioned",
                       [shard for shard in layout.shards() if layout.filtered(shard).exists()], "filtered")


def _has_run(instance: dg.DagsterInstance, run_key: str) -> bool:
    return bool(instance.get_run_ids(filters=dg.RunsFilter(tags={"dagster/run_key": run_key}), limit=1))


def partitions_in_flight(instance: dg.DagsterInstance, job_name: str) -> set[str]:
    """The partitions of ``job_name`` that an unfinished run is working on."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=list(UNFINISHED)))
    return {run.tags["dagster/partition"] for run in runs if "dagster/partition" in run.tags}


def failed_runs_by_request(instance: dg.DagsterInstance, job_name: str) -> Counter[str]:
    """How many runs of ``job_name`` failed per request: their run keys, attempts counted together."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.FAILURE]))
    return Counter(_ATTEMPT.sub("", run.tags.get("dagster/run_key", "")) for run in runs)


_ATTEMPT = re.compile(r"-retry\d+$")


def attempt_key(request: str, failed: int) -> str:
    """The run key of a request's next attempt. Dagster launches a run key once, whatever became of that
    run: a request whose run failed is asked for again under a new key."""
    return f"{request}-retry{failed}" if failed else request


def _stale_with(instance, config, asset: str, keys: list[str], name: str) -> list[tuple[str, str]]:
    """(key, the version of input ``name`` it would read now) of the keys of ``asset`` to run: the version
    makes each run key, so a run is requested again only once its input changed."""
    freshness = Freshness(instance, config)
    inputs = freshness.input_versions(asset)
    return [(key, version) for key in freshness.to_run(asset, keys) if (version := (inputs(key) or {}).get(name))]


def _end_orphaned_runs(context: dg.SensorEvaluationContext | dg.ScheduleEvaluationContext) -> None:
    """Each tick first fails the runs whose process is gone (orchestration/orphans.py): one such run holds its
    shard and its pool slot for good."""
    ended = end_orphaned_runs(context.instance)
    if ended:
        context.log.warning(f"marked {len(ended)} run(s) whose process is gone as failed, freeing their slots: "
                            + ", ".join(ended))


def build_automation(config: PipelineConfig, jobs: dict[str, dg.UnresolvedAssetJobDefinition]
                     ) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    @dg.sensor(jobs=[jobs["url_shards_job"], jobs["download_job"]],
               minimum_interval_seconds=config.automation.sensor_interval_s,
               description="Splits new or grown URL lists into shards, then downloads shards not yet downloaded.")
    def url_lists_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource):
        _end_orphaned_runs(context)
        instance, retries = context.instance, pipeline.config.automation.retries
        fingerprints = url_list_fingerprints(pipeline.config)
        cursor = json.loads(context.cursor) if context.cursor else {}
        requests, given_up = [], []
        # Each new state of the lists is a request of its own, numbered: a list taken out and put back
        # (same mtime and size) is sharded again.
        sharding = cursor.get("sharding", 0) + (fingerprints != cursor.get("lists", {}))
        digest = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
        request = f"url-lists-{sharding}-{digest}"
        failed = failed_runs_by_request(instance, "url_shards_job")[request]
        retry = 0 < failed <= retries and not _has_run(instance, attempt_key(request, failed))
        if sharding != cursor.get("sharding", 0) or retry:
            requests.append(dg.RunRequest(job_name="url_shards_job", run_key=attempt_key(request, failed),
                                          tags=launched_here()))
        elif failed > retries:
            given_up.append("the URL lists")
        # A shard's request changes with its URL rows and with each materialization of it: a shard
        # downloaded, then stale again (its file deleted, a download setting changed), is requested anew.
        materialized = instance.get_latest_storage_id_by_partition(dg.AssetKey("downloaded"),
                                                                   dg.DagsterEventType.ASSET_MATERIALIZATION)
        failed_downloads = failed_runs_by_request(instance, "download_job")
        for shard, version in shards_to_download(instance, pipeline.config):
            request = f"download-{shard}-{version}-{materialized.get(shard, 0)}"
            if failed_downloads[request] > retries:
                given_up.append(shard)
                continue
            requests.append(dg.RunRequest(job_name="download_job", partition_key=shard,
                                          run_key=attempt_key(request, failed_downloads[request]),
                                          tags=launched_here()))
        gave_up = (f"{len(given_up)} requests failed {retries + 1} times ({', '.join(given_up[:5])}"
                   f"{' ...' if len(given_up) > 5 else ''}): see their runs; `sd3 data run` or the UI runs them again")
        if not requests:
            return dg.SkipReason(gave_up if given_up else "no new URL lists and every registered shard is downloaded")
        if given_up:
            context.log.warning(gave_up)
        return dg.SensorResult(run_requests=requests,
                               cursor=json.dumps({"lists": fingerprints, "sharding": sharding}, sort_keys=True))

    @dg.schedule(cron_schedule=config.automation.recaption_cron, job=jobs["recaption_job"],
                 description="Recaptions filtered shards whose captions are not up to date.")
    def recaption_backfill(context: dg.ScheduleEvaluationContext, pipeline: PipelineResource):
        _end_orphaned_runs(context)
        stale = shards_to_recaption(context.instance, pipeline.config)
        running = partitions_in_flight(context.instance, "recaption_job")  # an hour may not caption a shard
        requests = [dg.RunRequest(partition_key=shard, run_key=f"recaption-{shard}-{version}", tags=launched_here())
                    for shard, version in stale if shard not in running]
        if not requests:
            return dg.SkipReason("every filtered shard is recaptioned" if not stale else
                                 f"the {len(stale)} shards to recaption are being recaptioned")
        return requests

    return [url_lists_sensor], [recaption_backfill]
