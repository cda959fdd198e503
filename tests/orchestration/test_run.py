"""`sd3 data run`'s housekeeping and freshness on the Dagster instance, against a real (temporary) instance."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from tests.processes import descendants, still_running

REPO = Path(__file__).resolve().parents[2]


def test_two_roots_on_one_instance_never_share_a_stage_version(tmp_path):
    # Freshness compares code versions first: with the root in them, a second config on the same
    # DAGSTER_HOME cannot take the first one's materializations (and files) as its own.
    from assets.pipeline import stage_code_versions
    from etl.config import PipelineConfig

    first, second = (stage_code_versions(PipelineConfig(root=tmp_path / name, sources=[])) for name in ("a", "b"))
    assert first.keys() == second.keys() and all(first[stage] != second[stage] for stage in first)
    assert stage_code_versions(PipelineConfig(root=tmp_path / "a", sources=[])) == first


def test_the_dedup_winners_go_stale_with_the_thresholds_they_were_chosen_under(tmp_path):
    # The winners are picked among rows under max_punsafe: filtering with new thresholds against old
    # winners would reject the new winner as punsafe and its copy as its duplicate, keeping neither.
    from assets.pipeline import stage_code_versions
    from etl.config import FilterConfig, PipelineConfig

    def versions(**filters):
        return stage_code_versions(PipelineConfig(root=tmp_path, sources=[], filter=FilterConfig(**filters)))

    assert versions(max_punsafe=0.2)["content_hashes"] != versions()["content_hashes"]
    assert versions(min_side=128)["content_hashes"] == versions()["content_hashes"]


def test_a_relative_dagster_home_is_made_absolute_for_dagster(tmp_path, monkeypatch):
    from orchestration.cli import dagster_home

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", "home")
    assert dagster_home() == tmp_path / "home"
    assert os.environ["DAGSTER_HOME"] == str(tmp_path / "home")
    with dg.DagsterInstance.get() as instance:  # Dagster refuses a relative DAGSTER_HOME
        assert instance.root_directory == str(tmp_path / "home")


def test_a_home_an_older_version_made_gets_the_newer_instance_settings_and_keeps_its_own(tmp_path, monkeypatch):
    import yaml

    from orchestration.cli import INSTANCE_SETTINGS, dagster_home

    home = tmp_path / "home"
    home.mkdir()
    older = "# mine\ntelemetry:\n  enabled: true\npython_logs:\n  managed_python_loggers: [etl]"  # no run_monitoring
    (home / "dagster.yaml").write_text(older)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    dagster_home()
    text = (home / "dagster.yaml").read_text()
    assert text.startswith(older + "\n")
    assert yaml.safe_load(text) == {**INSTANCE_SETTINGS, "telemetry": {"enabled": True}}
    dagster_home()
    assert (home / "dagster.yaml").read_text() == text
    with dg.DagsterInstance.get() as instance:  # Dagster takes the settings: monitoring on, no resuming
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0
        assert "MONITORING" in instance.get_required_daemon_types()


def test_the_etl_warnings_reach_the_event_log_of_the_run(tmp_path, monkeypatch):
    import yaml

    from orchestration.cli import dagster_home
    from orchestration.definitions import build_definitions

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    dagster_home()  # writes the instance's dagster.yaml
    urls = tmp_path / "cc12m.tsv"
    urls.write_text("http://127.0.0.1/a.png\ta caption\twith a tab too many\nhttp://127.0.0.1/b.png\tfine\n")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "run"), "sources": [
        {"name": "cc12m", "path": str(urls), "kind": "cc12m_tsv", "header": False}]}))
    defs = build_definitions(str(config))
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("url_shards_job").execute_in_process(instance=instance)
        messages = [event.user_message for event in instance.all_logs(result.run_id)]
    assert any("1 lines of" in m and "do not have its 2 columns; repaired" in m for m in messages), messages


# What `sd3 data run` does for one partition: its run in a spawned pool worker, captioning in a process of
# the worker's. The shard's filtered file is a FIFO no one writes to: the step blocks reading it.
KILLED_DATA_RUN = """
import multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor

from orchestration.partitions import shards
from orchestration.run import execute_partition

if __name__ == "__main__":
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    run = pool.submit(execute_partition, "recaption_job", dict(shards.get_tags_for_partition_key(sys.argv[1])))
    print(run.result(), flush=True)
"""


def _step_started(instance: dg.DagsterInstance) -> bool:
    runs = instance.get_runs()
    return bool(runs) and any(record.dagster_event.event_type == dg.DagsterEventType.STEP_START
                              for record in instance.all_logs(runs[0].run_id) if record.dagster_event)


def test_a_data_run_killed_outright_stops_its_runs_and_their_steps(tmp_path, monkeypatch):
    import yaml

    from etl.layout import DataLayout
    from orchestration.cli import dagster_home
    from orchestration.definitions import CONFIG_ENV
    from orchestration.lifetime import UNWIND_S
    from orchestration.partitions import shards

    shard = "stuck-00000"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    dagster_home()
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(tmp_path / "pipeline"), "sources": [{"name": "demo", "path": str(tmp_path / "urls.parquet")}],
        "recaption": {"backend": "alt-text"}, "buckets": {"resolutions": [64]}}))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    filtered = DataLayout(tmp_path / "pipeline").filtered(shard)
    filtered.parent.mkdir(parents=True)
    os.mkfifo(filtered)
    (tmp_path / "data_run.py").write_text(KILLED_DATA_RUN)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(shards.name, [shard])
        instance.event_log_storage.set_concurrency_slots("recaption", 1)
        stderr = tmp_path / "stderr.txt"  # a file, not a pipe: processes that outlive the test keep a pipe open
        with open(stderr, "w") as f:
            data_run = subprocess.Popen([sys.executable, str(tmp_path / "data_run.py"), shard], cwd=tmp_path,
                                        env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=f)
        processes: list[int] = []
        try:
            deadline = time.monotonic() + 120
            while not _step_started(instance):
                assert data_run.poll() is None and time.monotonic() < deadline, stderr.read_text()[-4000:]
                time.sleep(0.5)
            time.sleep(1.0)  # the step is in its blocking read
            processes = descendants(data_run.pid)  # the pool worker, its step and their helpers
            assert len(processes) >= 2
            data_run.kill()
            data_run.wait()

            alive = still_running(processes, within_s=UNWIND_S + 15)
            log = stderr.read_text()
            assert not alive, f"{alive} outlived the data run:\n{log[-4000:]}"
            # Interrupted, not cut off: the run recorded its failure and gave its captioning slot back.
            [run] = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.FAILURE
            assert instance.event_log_storage.get_concurrency_info("recaption").claimed_slots == []
            assert "is gone; stopping" in log
        finally:
            for pid in [data_run.pid, *processes]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
