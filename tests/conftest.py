from __future__ import annotations

from collections.abc import Iterator

import pytest

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
