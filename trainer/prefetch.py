"""What feeds a model rank's training loop: items made in a background thread, a bounded number ahead.

A model rank's batches come either from its loader rank over point-to-point receives
(``transport.BatchReceiver``) or from a feeder running in its own process (``feeder.LocalFeeder``); both
are a ``Prefetcher`` over their own iterator, so the loop sees one ``get()`` and one failure behaviour.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import torch


class _End:
    """The sentinel the thread enqueues after the last item."""


class Prefetcher:
    """Iterates ``items`` in a daemon thread, at most ``depth`` items ahead of ``get()``.

    ``get()`` returns (the next item, seconds the caller waited for it), then (None, 0.0) once the items are
    exhausted. An exception raised while producing is raised by ``get()`` in the caller's thread, and again
    by every later call: the source is broken and nothing after the failure is trusted.
    """

    def __init__(self, items: Iterator, depth: int, name: str):
        if depth < 1:
            raise ValueError(f"{type(self).__name__}: depth must be at least 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._ended = False
        # The current CUDA device is per thread, and a new thread's is GPU 0: a call that takes the current
        # device there would put a context (half a GiB) of every rank of the node on GPU 0.
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._thread = threading.Thread(target=self._run, args=(items, device), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator, cuda_device: int | None) -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            for item in items:
                self._queue.put(item)
        except BaseException as err:  # handed to get(), which raises it in the training thread
            self._queue.put(err)
            return
        self._queue.put(_End)

    def get(self) -> tuple[object | None, float]:
        if self._failure is not None:
            raise self._failure
        if self._ended:
            return None, 0.0
        start = time.perf_counter()
        item = self._queue.get()
        waited = time.perf_counter() - start
        if isinstance(item, BaseException):
            self._failure = item
            raise item
        if item is _End:
            self._ended = True
            return None, waited
        return item, waited

    def close(self) -> None:
        """Consume what is still coming until the end (a failure is raised), then join the thread."""
        while self.get()[0] is not None:
            pass
        self._thread.join()
