from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.mongo import MongodProcess
from tests.support import SOAK, BeanstalkdProcess

#: Per-test time limit under KQS_SOAK=1 (the long fault variants); the default is
#: pyproject.toml's `timeout`.
SOAK_TIMEOUT = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under KQS_SOAK=1, give every test the soak time limit (whoever runs the suite:
    ./scripts/test, scripts/reliability or pytest itself)."""
    if SOAK:
        for item in items:
            item.add_marker(pytest.mark.timeout(SOAK_TIMEOUT))


@pytest.fixture
def beanstalkd() -> Iterator[BeanstalkdProcess]:
    """A fresh real beanstalkd (no binlog) on a free loopback port."""
    server = BeanstalkdProcess()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongodProcess]:
    """One real mongod for the session; each test uses its own database
    (tests.mongo.unique_database)."""
    server = MongodProcess(tmp_path_factory.mktemp("mongod") / "db")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Finalize each test's garbage before the next test starts. A socket or file left
    open warns (ResourceWarning, an error here) when it is collected: this makes that
    happen in the test that leaked it, not in whichever later test the collector
    happens to run in."""
    yield
    gc.collect()
