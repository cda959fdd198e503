"""Watching the processes a test starts, through /proc (Linux)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, whichever of its threads started it, and in whatever session."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for task in Path(f"/proc/{parent}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # it ended meanwhile
            continue
        found += children
        todo += children
    return found


def command_line(pid: int) -> str:
    """Its arguments joined by spaces; empty once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def running(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def session(pid: int) -> int:
    return int(_stat(pid)[3])


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it, all at once. A process group would not reach processes
    that started sessions of their own (torchrun's ranks); the tree is stopped first so that nothing forks
    while it is read."""
    stopped: set[int] = set()
    while found := {root, *descendants(root)} - stopped:
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        stopped |= found
    for pid in stopped:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def still_running(pids: list[int], within_s: float) -> list[int]:
    """Those of ``pids`` still running after up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive
