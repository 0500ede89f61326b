from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BeanstalkdProcess, KqsProcess


@pytest.fixture
def kqs(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> Iterator[KqsProcess]:
    """A `kqs serve` process using the `beanstalkd` fixture, with a 4 KiB line limit."""
    server = KqsProcess(
        tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}", max_line_bytes=4096
    )
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def server(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> Iterator[KqsProcess]:
    """A `kqs serve` process using the `beanstalkd` fixture, with default limits."""
    kqs = KqsProcess(tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}")
    kqs.start()
    try:
        yield kqs
    finally:
        kqs.kill()
