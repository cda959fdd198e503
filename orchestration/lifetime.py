"""A step's process ends with the process that started it.

Dagster's multiprocess executor runs each recaption step in a child of the run worker. When the worker is
killed outright (SIGKILL, the OOM killer, a drained node), nothing tells the child: it would go on
captioning with its models on a GPU, holding that GPU's slot and the shard's work folder, while run
monitoring has already failed the run and lets the next run of the shard start (and stop at once, the work
folder being in use). multiprocessing gives every child it starts a sentinel, a pipe whose other end only
the parent holds: it becomes readable when the parent is gone, however it went.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from functools import cache

# Long enough for a step to unwind (its GPU slot given back, a vLLM engine shut down), short enough that
# the next run of the shard, which run monitoring starts about 20 s after the kill, rarely finds it alive.
UNWIND_S = 30.0
_parent_gone = threading.Event()


@cache
def end_with_parent(unwind_s: float = UNWIND_S) -> bool:
    """From now on this process is interrupted when its multiprocessing parent dies, as Dagster interrupts
    a step it terminates (SIGINT to the main thread, so the step's `with` blocks unwind and its failure is
    logged), and ended outright if it is still alive ``unwind_s`` seconds later. Returns whether there is
    a parent to watch: False in a process that multiprocessing did not start."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return False
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        # Ignored from birth: a shell ignores SIGINT in what it starts in the background, and a child inherits
        # that. The interrupt would be lost, and the step ended without recording its failure.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main_thread = threading.main_thread().ident

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        _parent_gone.set()
        print(f"pid {os.getpid()}: the process that started it ({parent.pid}) is gone; stopping",
              file=sys.stderr, flush=True)
        signal.pthread_kill(main_thread, signal.SIGINT)  # the main thread's blocking call returns EINTR
        time.sleep(unwind_s)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
    return True


def parent_gone() -> bool:
    """Whether ``end_with_parent`` saw this process's parent die (and interrupted it)."""
    return _parent_gone.is_set()
