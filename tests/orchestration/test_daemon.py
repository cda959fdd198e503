"""The sensor and the schedule under a real `dagster dev`: turned on the way the UI's toggles do it (GraphQL),
then the daemon evaluates them and launches the runs; nothing here executes a job itself.

A finished demo pipeline gives the schedule something to do (one shard's filtered rows change) and a URL
list dropped into the watched folder gives the sensor a new source to shard and download.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from etl.demo_source import make_demo_source
from etl.layout import DataLayout
from etl.serve import serve_directory
from etl.storage import read_parquet, write_parquet_atomic
from orchestration.lifetime import UNWIND_S
from orchestration.orphans import LAUNCHED_ON_TAG, process_space, run_worker_pid
from orchestration.run import run_pipeline
from tests.orchestration.browser import dagster_webserver, graphql
from tests.processes import descendants, still_running

pytestmark = pytest.mark.slow

IMAGES, SHARD_SIZE = 12, 6
DROPPED_LIST = "laion-part-7"  # the new source the sensor must find in the watched folder
# The schedule fires on the next minute boundary, then each launched run starts a process that imports
# the pipeline: minutes on a busy 2-core machine.
DAEMON_TIMEOUT_S = 420

AUTOMATION_QUERY = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name } sensors { name } schedules { name } } } } }"""
START_SENSOR = """mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
    __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""
START_SCHEDULE = """mutation($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) {
    __typename ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }"""


@pytest.fixture
def finished_pipeline(tmp_path, monkeypatch):
    """(home, config path, layout, watched folder, a stale shard); the URL server stays up for the test."""
    home, source, watch = tmp_path / "home", tmp_path / "source", tmp_path / "incoming"
    for folder in (home, source, watch):
        folder.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config_path = tmp_path / "pipeline.yaml"
    with serve_directory(source) as base_url:
        urls = make_demo_source(source, IMAGES, base_url)
        config_path.write_text(yaml.safe_dump({
            "root": str(tmp_path / "pipeline"),
            "sources": [{"name": "demo", "path": str(urls)}],
            "shard_size": SHARD_SIZE,
            "download": {"processes": 1, "threads": 4, "timeout": 10, "retries": 0},
            "recaption": {"backend": "alt-text"},
            "buckets": {"resolutions": [64]},
            "automation": {"watch_dir": str(watch), "recaption_cron": "* * * * *", "sensor_interval_s": 5},
        }))
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("SD3_PIPELINE_CONFIG", str(config_path))
        assert run_pipeline(config_path, log=lambda _: None).balanced

        layout = DataLayout(tmp_path / "pipeline")
        stale = layout.shards()[0]
        # Filtered again after captioning, one row fewer (say, a stricter filter): its captions are stale.
        write_parquet_atomic(read_parquet(layout.filtered(stale)).slice(1), layout.filtered(stale))
        shutil.copy(urls, watch / f"{DROPPED_LIST}.parquet")  # the same images under a new source name
        yield home, config_path, layout, stale


def start_automation(base_url: str) -> None:
    repositories = graphql(base_url, AUTOMATION_QUERY)["repositoriesOrError"]["nodes"]
    [repository] = repositories
    assert [s["name"] for s in repository["sensors"]] == ["url_lists_sensor"]
    assert [s["name"] for s in repository["schedules"]] == ["recaption_backfill"]
    where = {"repositoryLocationName": repository["location"]["name"], "repositoryName": repository["name"]}
    sensor = graphql(base_url, START_SENSOR, {"selector": {**where, "sensorName": "url_lists_sensor"}})
    assert sensor["startSensor"]["sensorState"]["status"] == "RUNNING", sensor
    schedule = graphql(base_url, START_SCHEDULE, {"selector": {**where, "scheduleName": "recaption_backfill"}})
    assert schedule["startSchedule"]["scheduleState"]["status"] == "RUNNING", schedule


def launched_runs(instance: dg.DagsterInstance, tag: str, name: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={tag: name})))


def test_daemon_launches_what_the_sensor_and_the_schedule_request(finished_pipeline, tmp_path):
    home, config_path, layout, stale = finished_pipeline
    new_shards = [f"{DROPPED_LIST}-{i:05d}" for i in range(IMAGES // SHARD_SIZE)]
    caption_time_before = layout.recaptioned(stale).stat().st_mtime_ns

    with dagster_webserver(home, config_path, tmp_path / "dagster_dev.log", daemon=True) as base_url, \
            dg.DagsterInstance.from_config(str(home)) as instance:
        start_automation(base_url)

        def settled() -> tuple[dict[str, list], bool]:
            runs = {
                "sensor": launched_runs(instance, "dagster/sensor_name", "url_lists_sensor"),
                "schedule": launched_runs(instance, "dagster/schedule_name", "recaption_backfill"),
            }
            downloads = {r.tags.get("dagster/partition") for r in runs["sensor"] if r.job_name == "download_job"}
            every_run_ended = all(r.is_finished for rs in runs.values() for r in rs)
            return runs, every_run_ended and downloads >= set(new_shards) and bool(runs["schedule"])

        deadline = time.monotonic() + DAEMON_TIMEOUT_S
        runs, done = settled()
        while not done and time.monotonic() < deadline:
            time.sleep(3)
            runs, done = settled()
        summary = {kind: [(r.job_name, r.tags.get("dagster/partition"), r.status.value) for r in rs]
                   for kind, rs in runs.items()}
        log = (tmp_path / "dagster_dev.log").read_text()[-4000:]
        assert done, f"the daemon did not launch and finish every requested run in time: {summary}\n{log}"

    failed = [s for rs in summary.values() for s in rs if s[2] != "SUCCESS"]
    assert not failed, f"daemon-launched runs failed: {failed}\n{log}"
    # Each says which host its worker ran on: a tick fails it should that worker die with its code server.
    assert {r.tags.get(LAUNCHED_ON_TAG) for rs in runs.values() for r in rs} == {process_space()}
    # The sensor: the dropped list became a source, its shards were registered and downloaded.
    assert {job for job, _, _ in summary["sensor"]} == {"url_shards_job", "download_job"}
    for shard in new_shards:
        assert read_parquet(layout.downloaded(shard)).num_rows + read_parquet(layout.rejects("download", shard)).num_rows \
            == SHARD_SIZE
    # The schedule: only the stale shard was recaptioned, and its captions are new.
    assert {(job, partition) for job, partition, _ in summary["schedule"]} == {("recaption_job", stale)}
    assert layout.recaptioned(stale).stat().st_mtime_ns > caption_time_before


LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
# The monitoring daemon polls every poll_interval_seconds and frees a slot free_slots_after_run_end_seconds
# after its run ended: a few of its ticks.
SLOT_FREED_TIMEOUT_S = 90


def test_a_daemon_launched_run_whose_worker_is_killed_fails_frees_its_pool_slot_and_its_step_ends(tmp_path, monkeypatch):
    from orchestration.cli import dagster_home
    from orchestration.partitions import shards

    home, shard = tmp_path / "home", "stuck-00000"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    dagster_home()  # the instance settings `sd3 ui` runs under
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump({
        "root": str(tmp_path / "pipeline"), "sources": [{"name": "demo", "path": str(tmp_path / "urls.parquet")}],
        "recaption": {"backend": "alt-text"}, "buckets": {"resolutions": [64]}}))
    layout = DataLayout(tmp_path / "pipeline")
    layout.filtered(shard).parent.mkdir(parents=True, exist_ok=True)
    # A FIFO with no writer: the recaption step blocks opening its input, holding its pool slot, until killed.
    os.mkfifo(layout.filtered(shard))
    stray: list[int] = []
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(shards.name, [shard])
        instance.event_log_storage.set_concurrency_slots("recaption", 1)
        try:
            with dagster_webserver(home, config_path, tmp_path / "dagster_dev.log", daemon=True) as base_url:
                [repository] = graphql(base_url, AUTOMATION_QUERY)["repositoriesOrError"]["nodes"]
                selector = {"repositoryLocationName": repository["location"]["name"],
                            "repositoryName": repository["name"], "jobName": "recaption_job"}
                # Submitted like a schedule's request: queued, then launched by the daemon.
                launched = graphql(base_url, LAUNCH_RUN, {"params": {"selector": selector, "executionMetadata": {
                    "tags": [{"key": "dagster/partition", "value": shard}]}}})["launchRun"]
                assert launched["__typename"] == "LaunchRunSuccess", launched
                run_id = launched["run"]["runId"]

                deadline = time.monotonic() + DAEMON_TIMEOUT_S
                while not (instance.event_log_storage.get_concurrency_info("recaption").claimed_slots
                           and (worker := run_worker_pid(instance, run_id))):
                    assert time.monotonic() < deadline, f"the run never claimed its slot: " \
                        f"{instance.get_run_by_id(run_id).status}\n{(tmp_path / 'dagster_dev.log').read_text()[-4000:]}"
                    time.sleep(1)
                stray = descendants(worker)  # the step's process (and multiprocessing's helpers)
                assert stray, "the recaption step runs in a process of its own"
                os.kill(worker, signal.SIGKILL)
                killed_at = time.monotonic()

                deadline = killed_at + SLOT_FREED_TIMEOUT_S
                while not (instance.get_run_by_id(run_id).is_finished
                           and not instance.event_log_storage.get_concurrency_info("recaption").claimed_slots):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(1)
                status = instance.get_run_by_id(run_id).status
                claimed = instance.event_log_storage.get_concurrency_info("recaption").claimed_slots
                assert status == dg.DagsterRunStatus.FAILURE
                assert claimed == [], f"the dead run still holds {claimed} {SLOT_FREED_TIMEOUT_S} s after the kill"
                print(f"run failed and its slot freed {time.monotonic() - killed_at:.0f} s after the kill")
                # The step was blocked in a read: it is interrupted, not left captioning on a GPU it holds.
                alive = still_running(stray, within_s=UNWIND_S + 15)
                assert not alive, f"the killed worker's processes {alive} outlived it\n" \
                    f"{(tmp_path / 'dagster_dev.log').read_text()[-4000:]}"
        finally:
            for pid in stray:  # when the assertion above failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
