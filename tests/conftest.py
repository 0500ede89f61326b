from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mongo import MongodProcess
from tests.support import BeanstalkdProcess


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
