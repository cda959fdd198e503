"""A process started by multiprocessing ends when its parent is killed outright: interrupted first, so its
`with` blocks unwind; ended outright when it ignores the interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestration.lifetime import end_with_parent
from tests.processes import running, still_running

REPO = Path(__file__).resolve().parents[2]

# The parent starts a spawned child as Dagster's multiprocess executor does, prints its pid, and waits to be
# killed. The child blocks opening a FIFO nobody writes to, as the daemon test's step does.
PARENT = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from pathlib import Path

    from orchestration.lifetime import end_with_parent

    def child(fifo, ready, unwound, case):
        end_with_parent(unwind_s=2.0)
        if case == "ignores-the-interrupt":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            Path(ready).touch()
            open(fifo).read()
        finally:
            Path(unwound).write_text("unwound")

    if __name__ == "__main__":
        fifo, ready, unwound, case = sys.argv[1:5]
        if case == "born-ignoring-interrupts":  # as whatever a shell starts in the background is
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        process = multiprocessing.get_context("spawn").Process(target=child, args=(fifo, ready, unwound, case))
        process.start()
        print(process.pid, flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("case", ["unwinds", "born-ignoring-interrupts", "ignores-the-interrupt"])
def test_a_child_ends_when_its_parent_is_killed_outright(tmp_path, case):
    fifo, ready, unwound = tmp_path / "fifo", tmp_path / "ready", tmp_path / "unwound"
    os.mkfifo(fifo)
    (tmp_path / "parent.py").write_text(PARENT)
    stderr = tmp_path / "stderr.txt"  # a file, not a pipe: reading a pipe the child holds would wait for it
    with open(stderr, "w") as f:
        parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(fifo), str(ready), str(unwound), case],
                                  cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, stderr=f, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 120  # a spawned child starts slowly on a loaded machine
        while not ready.exists():
            assert running(child) and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # in its blocking open
        parent.kill()
        parent.wait()
        assert not still_running([child], within_s=20), f"the child outlived its killed parent\n{stderr.read_text()}"
        log = stderr.read_text()
        assert f"({parent.pid}) is gone; stopping" in log
        # Interrupted, its finally block ran (a SIGINT ignored since birth is let through first); ignoring
        # the interrupt on purpose, it was ended without one.
        assert unwound.exists() == (case != "ignores-the-interrupt"), log
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_process_multiprocessing_did_not_start_has_no_parent_to_watch():
    assert end_with_parent() is False
