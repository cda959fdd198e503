"""Prefetcher: what both of a model rank's batch sources (BatchReceiver, LocalFeeder) are built on."""

import threading
import time

import pytest

from trainer.prefetch import Prefetcher


def test_items_in_order_then_none_forever():
    source = Prefetcher(iter([1, 2, 3]), depth=2, name="test")
    assert [source.get()[0] for _ in range(3)] == [1, 2, 3]
    assert source.get()[0] is None
    assert source.get() == (None, 0.0)
    source.close()


def test_runs_at_most_depth_items_ahead():
    made = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    source = Prefetcher(items(), depth=2, name="test")
    # The thread fills the queue (2) and makes one more that waits for room: never all ten.
    time.sleep(0.5)  # time for the thread to run ahead as far as it may
    assert len(made) <= 3
    assert source.get()[0] == 0
    source.close()
    assert len(made) == 10


def test_a_failure_is_raised_in_the_caller_and_again_after():
    def items():
        yield "ok"
        raise ConnectionError("peer died")

    source = Prefetcher(items(), depth=1, name="test")
    assert source.get()[0] == "ok"
    with pytest.raises(ConnectionError, match="peer died"):
        source.get()
    with pytest.raises(ConnectionError, match="peer died"):
        source.get()
    with pytest.raises(ConnectionError):
        source.close()


def test_waited_seconds_measure_the_wait_for_a_slow_producer():
    gate = threading.Event()

    def items():
        gate.wait()
        yield "late"

    source = Prefetcher(items(), depth=1, name="test")
    threading.Timer(0.2, gate.set).start()
    item, waited = source.get()
    assert item == "late" and waited >= 0.15
    source.close()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Prefetcher(iter([]), depth=0, name="test")
