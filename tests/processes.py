"""Watching the processes a test starts, through /proc (Linux)."""

from __future__ import annotations

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


def running(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def still_running(pids: list[int], within_s: float) -> list[int]:
    """Those of ``pids`` still running after up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive
