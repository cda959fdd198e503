"""Suite-wide hooks: the demo learning test's training starts before the first test and its test runs last.

See tests/demo_training.py for why: the training runs at the lowest priority beside the rest of the suite,
and the test that waits for it and scores its samples comes after everything else.
"""

from __future__ import annotations

import pytest

from tests.demo_training import BackgroundTraining

DEMO_TRAINING = pytest.StashKey[BackgroundTraining]()


def _wants_demo_training(item: pytest.Item) -> bool:
    return item.get_closest_marker("demo_training") is not None


def _started(config: pytest.Config) -> BackgroundTraining:
    if DEMO_TRAINING not in config.stash:
        config.stash[DEMO_TRAINING] = BackgroundTraining.start()
    return config.stash[DEMO_TRAINING]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_wants_demo_training)  # stable: the other tests keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.option.collectonly and any(_wants_demo_training(item) for item in session.items):
        _started(session.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    training = session.config.stash.get(DEMO_TRAINING, None)
    if training is not None:
        training.stop()


@pytest.fixture
def demo_training(request: pytest.FixtureRequest) -> BackgroundTraining:
    """The session's demo training (started here if collection did not, as when a plugin added the test)."""
    return _started(request.config)
