"""tests/demo_training.py's process handling: what the learning test's background run relies on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.demo_training import LOWEST_PRIORITY, _kill_tree, _lower_autogroup
from tests.processes import descendants, still_running

# A parent that starts a child in a session of its own, as torchrun starts its ranks, then sleeps.
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def _tree_with_a_child_in_its_own_session() -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (children := descendants(parent.pid)):
        assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    assert _session(children[0]) != _session(parent.pid)
    return parent, children[0]


def _session(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


def test_kill_tree_reaches_a_child_in_a_session_of_its_own():
    parent, child = _tree_with_a_child_in_its_own_session()
    try:
        _kill_tree(parent.pid)
        parent.wait(30)
        assert not still_running([child], within_s=10)
    finally:
        if parent.poll() is None:  # a reaped pid may be another process's by now
            _kill_tree(parent.pid)
            parent.wait()


def test_lowering_a_child_s_autogroup_leaves_this_process_s_alone():
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("a kernel without autogroups: there the processes' own nice is what counts")
    parent, child = _tree_with_a_child_in_its_own_session()
    try:
        untouched = {pid: Path(f"/proc/{pid}/autogroup").read_text() for pid in ("self", parent.pid)}
        _lower_autogroup(child)
        assert Path(f"/proc/{child}/autogroup").read_text().split()[-1] == str(LOWEST_PRIORITY)
        assert {pid: Path(f"/proc/{pid}/autogroup").read_text() for pid in untouched} == untouched
    finally:
        if parent.poll() is None:  # a reaped pid may be another process's by now
            _kill_tree(parent.pid)
            parent.wait()
