"""Runs whose process is gone: failed, and their concurrency slots freed.

Such a run can never end on its own, and the slot it holds (recaption's pool) would block every later run
for good, as would the run itself to the schedule, which requests no shard an unfinished run is working on.
Dagster's run monitoring fails a run whose worker died only when someone can tell: the code server that
spawned the worker (gone too when it was killed with it), or a run launcher that checks worker health (the
default one cannot). So the processes that know where a run executes judge it here: `sd3 data run` at its
start, and the sensor and the schedule at each tick.

A run is judged only where its process is known to share this process's pid space (`process_space`): a pool
worker of `sd3 data run` tags its runs with its space and pid; the sensor's and the schedule's runs carry
the space of the code server whose default run launcher starts their worker there, whose pid the worker
reports in its first engine event. Runs launched from the UI carry neither and are left to run monitoring.
"""

from __future__ import annotations

import os
import socket
from functools import cache

import dagster as dg

# A run in one of these may still write its partition: requesting the partition again would start a
# second run over the same shard (a schedule's run keys only dedupe within one tick).
UNFINISHED = (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)
# "<process space>:<pid>" of the process that executes a run (a pool worker of `sd3 data run`).
EXECUTOR_TAG = "sd3/executor"
# The process space of the code server that launched a run the sensor or the schedule requested.
LAUNCHED_ON_TAG = "sd3/launched-on"


@cache  # a process keeps its host and namespace; a tick tags every request with it
def process_space() -> str:
    """Where a pid names one process: this host and, on Linux, its pid namespace. Containers on one host
    can share its name (host networking) and an instance on a shared volume, but not their pids."""
    host = socket.gethostname()
    try:
        return f"{host}/pidns-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS)
        return host


def executor_tags() -> dict[str, str]:
    """Tags for a run this process executes itself."""
    return {EXECUTOR_TAG: f"{process_space()}:{os.getpid()}"}


def launched_here() -> dict[str, str]:
    """Tags for a run request: its worker will run in this process space (a sensor or schedule is evaluated
    in the code server that launches its runs)."""
    return {LAUNCHED_ON_TAG: process_space()}


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid the run worker announces in its "Started process for run" event (dagster/_grpc/impl.py)."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.engine_event_data
        if record.message.startswith("Started process for run") and "pid" in data.metadata:
            return int(data.metadata["pid"].value)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _local_process(instance: dg.DagsterInstance, run: dg.DagsterRun, space: str) -> int | None:
    """The pid of the process in ``space`` that executes ``run``; None where it is elsewhere or not known."""
    executor = run.tags.get(EXECUTOR_TAG)
    if executor:
        executor_space, _, pid = executor.rpartition(":")
        return int(pid) if executor_space == space and pid.isdigit() else None
    # Another launcher (Docker, Kubernetes) starts the worker elsewhere, and a pid there means nothing here.
    if run.tags.get(LAUNCHED_ON_TAG) == space and isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        return run_worker_pid(instance, run.run_id)  # None until the worker has started
    return None


def end_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the unfinished runs whose process in this pid space is gone, and free their concurrency
    slots; returns their run ids."""
    space = process_space()
    ended = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=list(UNFINISHED))):
        pid = _local_process(instance, run, space)
        if pid is None or _alive(pid):
            continue
        instance.report_run_failed(run, message=f"its process (pid {pid} on {space}) ended before the run did")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        ended.append(run.run_id)
    return ended
