"""Runs whose process is gone are failed and their pool slots freed, on a real (temporary) instance."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import dagster as dg
from dagster._core.events import EngineEventData

from orchestration.orphans import (EXECUTOR_TAG, LAUNCHED_ON_TAG, end_orphaned_runs, executor_tags, launched_here,
                                  process_space, run_worker_pid)

STARTED = dg.DagsterRunStatus.STARTED


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def add_started_run(instance: dg.DagsterInstance, run_id: str, tags: dict[str, str], worker_pid: int | None = None,
                    job_name: str = "recaption_job") -> dg.DagsterRun:
    """A run as the instance holds it mid-run; with ``worker_pid``, the event its run worker writes first
    when a code server launched it (dagster/_grpc/impl.py)."""
    run = instance.add_run(dg.DagsterRun(job_name=job_name, run_id=run_id, status=STARTED, tags=tags))
    if worker_pid is not None:
        instance.report_engine_event(f"Started process for run (pid: {worker_pid}).", run,
                                     EngineEventData.in_process(worker_pid))
    return run


def test_runs_whose_process_died_are_failed_and_their_pool_slots_freed():
    space = process_space()
    with dg.instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("recaption", 2)
        add_started_run(instance, "data-run-killed", {EXECUTOR_TAG: f"{space}:{dead_pid()}"})
        add_started_run(instance, "data-run-alive", executor_tags())
        add_started_run(instance, "data-run-elsewhere", {EXECUTOR_TAG: f"another-host:{dead_pid()}"})
        # The sensor's and the schedule's runs: their worker's pid comes from its first event.
        add_started_run(instance, "worker-killed", launched_here(), worker_pid=dead_pid())
        add_started_run(instance, "worker-alive", launched_here(), worker_pid=os.getpid())
        add_started_run(instance, "worker-not-started-yet", launched_here())
        add_started_run(instance, "worker-elsewhere", {LAUNCHED_ON_TAG: "another-host"}, worker_pid=dead_pid())
        add_started_run(instance, "from-the-ui", {}, worker_pid=dead_pid())  # not known to be on this host
        for run_id in ("data-run-killed", "worker-killed"):
            instance.event_log_storage.claim_concurrency_slot("recaption", run_id, "recaptioned")

        assert sorted(end_orphaned_runs(instance)) == ["data-run-killed", "worker-killed"]
        failed = {run.run_id for run in instance.get_runs() if run.status == dg.DagsterRunStatus.FAILURE}
        assert failed == {"data-run-killed", "worker-killed"}
        assert {run.status for run in instance.get_runs() if run.run_id not in failed} == {STARTED}
        assert instance.event_log_storage.get_concurrency_info("recaption").claimed_slots == []
        [failure] = instance.all_logs("worker-killed", of_type=dg.DagsterEventType.RUN_FAILURE)
        assert f"on {space}) ended before the run did" in failure.message
        assert end_orphaned_runs(instance) == []


def test_the_worker_pid_is_read_from_the_run_worker_event_only():
    with dg.instance_for_test() as instance:
        run = add_started_run(instance, "run", launched_here())
        # Executors announce their own processes with a pid too: a step's child may be gone mid-run.
        instance.report_engine_event("Executing steps using multiprocess executor: parent process (pid: 1)", run,
                                     EngineEventData.multiprocess(1))
        assert run_worker_pid(instance, "run") is None
        instance.report_engine_event(f"Started process for run (pid: {os.getpid()}).", run,
                                     EngineEventData.in_process(os.getpid()))
        assert run_worker_pid(instance, "run") == os.getpid()


def test_a_pid_is_judged_only_in_its_own_pid_namespace():
    # A container on this host can share its name (host networking) and the instance, not its pids.
    namespace = os.readlink("/proc/self/ns/pid")  # "pid:[<inode>]"
    assert process_space() == f"{socket.gethostname()}/pidns-{namespace[5:-1]}"


def test_a_run_launcher_that_starts_workers_elsewhere_leaves_the_runs_to_run_monitoring():
    # Docker or Kubernetes start the worker in a container of their own: a pid there means nothing here.
    launcher = {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}
    with dg.instance_for_test(overrides={"run_launcher": launcher}) as instance:
        add_started_run(instance, "in-a-container", launched_here(), worker_pid=dead_pid())
        assert end_orphaned_runs(instance) == []
        assert instance.get_run_by_id("in-a-container").status == STARTED
