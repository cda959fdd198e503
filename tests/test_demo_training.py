"""The process handling that the learning test's background run relies on (tests/demo_training.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.demo_training import LOWEST_PRIORITY, REPO, _lower_autogroup
from tests.processes import descendants, kill_tree, session, still_running

# A parent that starts a child in a session of its own, as torchrun starts its ranks, then sleeps.
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""

# A stand-in for pytest whose child supervises a training that sleeps, as tests.demo_training's main does.
SUPERVISOR = (
    "import os, subprocess, sys\n"
    "from tests.demo_training import supervise\n"
    "parent = os.getppid()\n"
    "sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "supervise(sleeper, parent)\n"
)
PYTEST_STAND_IN = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {SUPERVISOR!r}])
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


def test_the_training_ends_when_pytest_is_killed_before_it_could_stop_it():
    stand_in = subprocess.Popen([sys.executable, "-c", PYTEST_STAND_IN], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(below := descendants(stand_in.pid)) < 2:  # the supervisor and its training
            assert stand_in.poll() is None and time.monotonic() < deadline, "the training never started"
            time.sleep(0.1)
        stand_in.kill()
        stand_in.wait()
        assert not still_running(below, within_s=15)
    finally:
        if stand_in.poll() is None:
            kill_tree(stand_in.pid)
            stand_in.wait()
