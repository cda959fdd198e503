"""The sensor and the schedule, evaluated in-process against a real Dagster instance."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from etl.layout import DataLayout
from etl.storage import write_parquet_atomic
from orchestration.definitions import build_definitions
from orchestration.orphans import LAUNCHED_ON_TAG, process_space
from tests.orchestration.test_orphans import add_started_run, dead_pid


def url_list(path, n):
    pq.write_table(pa.table({"url": [f"ftp://127.0.0.1/{i}.png" for i in range(n)],  # rejected, never fetched
                             "caption": [f"image {i}" for i in range(n)]}), path)


@pytest.fixture
def setup(tmp_path):
    watch = tmp_path / "incoming"
    watch.mkdir()
    url_list(watch / "laion-part-1.parquet", 5)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(tmp_path / "run"), "sources": [], "shard_size": 2,
        "automation": {"watch_dir": str(watch), "recaption_cron": "*/15 * * * *"},
        "buckets": {"resolutions": [64]},
    }))
    defs = build_definitions(str(config))
    with dg.instance_for_test() as instance:
        yield defs, instance, watch, DataLayout(tmp_path / "run")


def resources(defs):
    return {"pipeline": defs.resources["pipeline"]}


def evaluate_sensor(defs, instance, cursor=None):
    sensor = defs.resolve_sensor_def("url_lists_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                 resources=resources(defs)) as context:
        return sensor(context)


def test_sensor_registers_new_url_lists_and_requests_downloads(setup):
    defs, instance, watch, layout = setup
    first = evaluate_sensor(defs, instance)
    assert [r.job_name for r in first.run_requests] == ["url_shards_job"]

    # What the daemon would launch: the url_shards run registers one partition per shard.
    assert defs.resolve_job_def("url_shards_job").execute_in_process(instance=instance).success
    assert instance.get_dynamic_partitions("shards") == ["laion-part-1-00000", "laion-part-1-00001",
                                                         "laion-part-1-00002"]
    second = evaluate_sensor(defs, instance, cursor=first.cursor)
    assert {(r.job_name, r.partition_key) for r in second.run_requests} == {
        ("download_job", s) for s in instance.get_dynamic_partitions("shards")}

    url_list(watch / "cc12m-extra.parquet", 3)
    third = evaluate_sensor(defs, instance, cursor=second.cursor)
    assert "url_shards_job" in [r.job_name for r in third.run_requests]


def test_a_sensor_tick_fails_a_run_whose_worker_died_with_its_code_server(setup):
    defs, instance, _, _ = setup
    first = evaluate_sensor(defs, instance)
    assert [r.tags for r in first.run_requests] == [{LAUNCHED_ON_TAG: process_space()}]
    add_started_run(instance, "worker-killed", first.run_requests[0].tags, worker_pid=dead_pid(),
                    job_name="url_shards_job")
    evaluate_sensor(defs, instance, cursor=first.cursor)
    assert instance.get_run_by_id("worker-killed").status == dg.DagsterRunStatus.FAILURE


def test_shards_gone_from_the_url_lists_leave_the_partitions(setup):
    defs, instance, watch, layout = setup
    job = defs.resolve_job_def("url_shards_job")
    assert job.execute_in_process(instance=instance).success
    assert len(instance.get_dynamic_partitions("shards")) == 3
    url_list(watch / "laion-part-1.parquet", 3)  # the list shrinks from 5 rows (3 shards) to 3 (2)
    assert job.execute_in_process(instance=instance).success
    assert instance.get_dynamic_partitions("shards") == layout.shards() == ["laion-part-1-00000", "laion-part-1-00001"]
    event = instance.get_latest_materialization_event(dg.AssetKey("url_shards"))
    assert event.asset_materialization.metadata["removed_shards"].value == 1


def materialize(defs, instance, job: str, partition_keys=(None,)) -> None:
    for key in partition_keys:
        assert defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=key).success


def test_sensor_downloads_a_shard_again_when_its_url_list_grew(setup):
    defs, instance, watch, layout = setup
    materialize(defs, instance, "url_shards_job")
    shards = layout.shards()
    materialize(defs, instance, "download_job", shards)
    first = evaluate_sensor(defs, instance)
    assert [r.job_name for r in first.run_requests] == ["url_shards_job"]  # no download: all up to date

    url_list(watch / "laion-part-1.parquet", 6)  # the last shard, rows 4-5, gains a row
    materialize(defs, instance, "url_shards_job")
    second = evaluate_sensor(defs, instance, cursor=first.cursor)
    downloads = [r for r in second.run_requests if r.job_name == "download_job"]
    assert [r.partition_key for r in downloads] == [shards[-1]]
    assert downloads[0].run_key.startswith(f"download-{shards[-1]}-")  # a new key for each new list


def test_schedule_backfills_the_captions_that_are_not_up_to_date(setup):
    defs, instance, _, layout = setup
    materialize(defs, instance, "url_shards_job")
    shards = layout.shards()
    materialize(defs, instance, "download_job", shards)  # every URL invalid: the shards hold rejects only
    materialize(defs, instance, "hashes_job")
    materialize(defs, instance, "filter_job", shards)
    materialize(defs, instance, "recaption_job", shards[:2])  # the third shard is never captioned
    later = time.time_ns() + 10**9
    os.utime(layout.filtered(shards[0]), ns=(later, later))  # touched, the same rows: still up to date
    write_parquet_atomic(pa.table({"key": ["k"]}), layout.filtered(shards[1]))  # other rows: stale

    schedule = defs.resolve_schedule_def("recaption_backfill")
    with dg.build_schedule_context(instance=instance, resources=resources(defs)) as context:
        requests = schedule(context)
    assert sorted(r.partition_key for r in requests) == sorted(shards[1:])
    assert schedule.cron_schedule == "*/15 * * * *"

    assert all(r.tags[LAUNCHED_ON_TAG] == process_space() for r in requests)

    # A shard whose run is still going is not requested a second time at the next tick...
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        run = add_started_run(instance, "still-captioning", {"dagster/partition": shards[2], **requests[0].tags},
                              worker_pid=worker.pid)
        instance.event_log_storage.claim_concurrency_slot("recaption", run.run_id, "recaptioned")
        with dg.build_schedule_context(instance=instance, resources=resources(defs)) as context:
            assert [r.partition_key for r in schedule(context)] == [shards[1]]
    finally:
        worker.kill()
        worker.wait()
    # ...unless its worker died (with the code server that could have said so): the tick fails the run,
    # frees its slot, and asks for the shard again.
    with dg.build_schedule_context(instance=instance, resources=resources(defs)) as context:
        assert sorted(r.partition_key for r in schedule(context)) == sorted(shards[1:])
    assert instance.get_run_by_id("still-captioning").status == dg.DagsterRunStatus.FAILURE
    assert instance.event_log_storage.get_concurrency_info("recaption").claimed_slots == []


def test_a_shard_breaking_the_bucket_invariants_is_neither_written_nor_recorded(setup, monkeypatch):
    # A failed blocking check would still record the materialization, and `sd3 data run` would count the
    # shard as done: the asset fails before writing instead.
    import assets.pipeline

    defs, instance, _, layout = setup
    materialize(defs, instance, "url_shards_job")
    shard = layout.shards()[0]
    materialize(defs, instance, "download_job", [shard])
    materialize(defs, instance, "hashes_job")
    materialize(defs, instance, "filter_job", [shard])
    materialize(defs, instance, "recaption_job", [shard])
    monkeypatch.setattr(assets.pipeline, "bucketed_violations", lambda *_: {"not_multiple_of_16": ["k-1"]})
    key = str(dg.MultiPartitionKey({"shard": shard, "resolution": "64"}))
    result = defs.resolve_job_def("bucket_job").execute_in_process(instance=instance, partition_key=key,
                                                                     raise_on_error=False)
    assert not result.success
    assert "bucket_invariants" in str(result.failure_data_for_node("bucketed").error)
    assert not layout.bucketed(64, shard).exists() and not layout.rejects("bucket_64", shard).exists()
    assert instance.get_materialized_partitions(dg.AssetKey("bucketed")) == set()


def test_a_shard_whose_every_url_met_a_network_failure_is_not_recorded_as_downloaded(setup):
    # Recorded, it would count as downloaded for good; failing, the next run tries it again.
    defs, instance, watch, layout = setup
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.png" for i in range(2)],  # port 9: refused
                             "caption": ["a", "b"]}), watch / "laion-part-1.parquet")
    materialize(defs, instance, "url_shards_job")
    shard = layout.shards()[0]
    result = defs.resolve_job_def("download_job").execute_in_process(instance=instance, partition_key=shard,
                                                                       raise_on_error=False)
    assert not result.success
    assert "failed with a timeout, a connection error or a 429/502/503/504" in str(result.failure_data_for_node("downloaded").error)
    assert not layout.downloaded(shard).exists()
    assert instance.get_materialized_partitions(dg.AssetKey("downloaded")) == set()


def run_as_the_sensor_would(defs, instance, request: dg.RunRequest) -> bool:
    """Launch ``request`` in-process with the tags the daemon gives a sensor's run; True when it succeeded."""
    job = defs.resolve_job_def(request.job_name)
    return job.execute_in_process(instance=instance, partition_key=request.partition_key, raise_on_error=False,
                                  tags={"dagster/run_key": request.run_key}).success


def test_a_failed_download_is_asked_for_again_under_a_new_run_key_then_given_up(tmp_path):
    # Dagster launches a run key once, whatever became of its run: the same key again would never retry.
    watch = tmp_path / "incoming"
    watch.mkdir()
    url_list(watch / "laion-part-1.parquet", 1)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "run"), "sources": [], "shard_size": 2,
                                      "automation": {"watch_dir": str(watch), "retries": 1}}))
    defs = build_definitions(str(config))
    with dg.instance_for_test() as instance:
        first = evaluate_sensor(defs, instance)
        assert run_as_the_sensor_would(defs, instance, first.run_requests[0])
        DataLayout(tmp_path / "run").urls("laion-part-1-00000").write_bytes(b"torn")  # every download of it fails
        keys = []
        cursor = first.cursor
        for _ in range(2):
            tick = evaluate_sensor(defs, instance, cursor=cursor)
            [download] = tick.run_requests
            keys.append(download.run_key)
            assert not run_as_the_sensor_would(defs, instance, download)
            cursor = tick.cursor
        assert keys[1] == keys[0] + "-retry1"
        last = evaluate_sensor(defs, instance, cursor=cursor)
        assert isinstance(last, dg.SkipReason) and "1 requests failed 2 times (laion-part-1-00000)" in last.skip_message


def test_a_url_list_put_back_and_a_shard_stale_again_get_new_run_keys(setup):
    defs, instance, watch, layout = setup
    first = evaluate_sensor(defs, instance)
    assert run_as_the_sensor_would(defs, instance, first.run_requests[0])
    downloads = evaluate_sensor(defs, instance, cursor=first.cursor)
    shard = layout.shards()[0]
    [request] = [r for r in downloads.run_requests if r.partition_key == shard]
    assert run_as_the_sensor_would(defs, instance, request)  # every URL invalid: a shard of rejects
    layout.downloaded(shard).unlink()  # lost: stale again, under a key of its own
    [again] = [r for r in evaluate_sensor(defs, instance, cursor=downloads.cursor).run_requests
               if r.partition_key == shard]
    assert again.run_key != request.run_key

    moved = watch.parent / "laion-part-1.parquet"
    (watch / "laion-part-1.parquet").rename(moved)
    gone = evaluate_sensor(defs, instance, cursor=downloads.cursor)
    moved.rename(watch / "laion-part-1.parquet")  # back, with its mtime and size: the lists as at first
    back = evaluate_sensor(defs, instance, cursor=gone.cursor)
    sharding_keys = [tick.run_requests[0].run_key for tick in (first, gone, back)]
    assert len(set(sharding_keys)) == 3 and all(key.startswith("url-lists-") for key in sharding_keys)


def test_a_failed_sharding_is_asked_for_again(setup):
    defs, instance, watch, layout = setup
    (watch / "laion-part-1.parquet").write_bytes(b"not parquet")
    first = evaluate_sensor(defs, instance)
    assert not run_as_the_sensor_would(defs, instance, first.run_requests[0])
    retry = evaluate_sensor(defs, instance, cursor=first.cursor)
    assert [r.run_key for r in retry.run_requests] == [first.run_requests[0].run_key + "-retry1"]
    url_list(watch / "laion-part-1.parquet", 5)  # mended (and so a new state of the lists)
    assert run_as_the_sensor_would(defs, instance, evaluate_sensor(defs, instance, cursor=retry.cursor).run_requests[0])
