"""The process handling that the learning test's background run relies on (tests/demo_training.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.demo_training import LOWEST_PRIORITY, _lower_autogroup
from tests.processes import descendants, kill_tree, session, still_running

# A parent that starts a child in a session of its own, as torchrun starts its ranks, then sleeps.
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


@pytest.fixture
def tree():
    """(parent, child): a parent in a session of its own and its child in another."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (children := descendants(parent.pid)):
            assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        assert session(children[0]) != session(parent.pid)
        yield parent, children[0]
    finally:
        if parent.poll() is None:  # once reaped, its pid may be another process's
            kill_tree(parent.pid)
            parent.wait()


def test_kill_tree_reaches_a_child_in_a_session_of_its_own(tree):
    parent, child = tree
    kill_tree(parent.pid)
    parent.wait(30)
    assert not still_running([child], within_s=10)


def test_lowering_a_child_s_autogroup_leaves_this_process_s_alone(tree):
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("a kernel without autogroups: there the processes' own nice is what counts")
    parent, child = tree
    untouched = {pid: Path(f"/proc/{pid}/autogroup").read_text() for pid in ("self", parent.pid)}
    _lower_autogroup(child)
    assert Path(f"/proc/{child}/autogroup").read_text().split()[-1] == str(LOWEST_PRIORITY)
    assert {pid: Path(f"/proc/{pid}/autogroup").read_text() for pid in untouched} == untouched
