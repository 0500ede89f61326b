"""Large payloads on a real server: file bulk store, references in beanstalkd, limits, gc."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson
import pytest

from kqs.client import Client, RemoteError
from kqs.store import FileStore
from kqs.store.fs import file_name
from tests.integration.helpers import beanstalk_contents, kqs_stats, wait_fed
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

MiB = 2**20


def bulk_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "bulk").rglob("*") if p.is_file() and ".tmp" not in p.name]


@pytest.fixture
def big_kqs(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> KqsProcess:
    server = KqsProcess(
        tmp_path / "data",
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
        max_payload_bytes=8 * MiB,
        max_line_bytes=10 * MiB,
        gc_window=60,
    )
    server.start()
    return server


def test_a_large_job_is_stored_and_beanstalkd_gets_a_reference(
    big_kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    try:
        data = "z" * (5 * MiB)
        with Client("127.0.0.1", big_kqs.port) as c:
            big = c.insert("big", data)
            small = c.insert("small", 1)
        wait_fed(big_kqs.port)
        present = beanstalk_contents(beanstalkd.host, beanstalkd.port)
        assert set(present) == {big, small}
        assert present[big]["tube"] == "big"
        files = bulk_files(big_kqs.data_dir)
        assert len(files) == 1
        assert orjson.loads(files[0].read_bytes())["data"] == data
        assert kqs_stats(big_kqs.port)["bulk"]["stored"] == 1
        with Client("127.0.0.1", big_kqs.port) as c:
            c.call("finish", {"id": big, "outcome": "done"})
        wait_until(lambda: not bulk_files(big_kqs.data_dir), what="payload deleted")
    finally:
        big_kqs.kill()


def test_over_the_payload_limit_is_refused_and_nothing_journaled(big_kqs: KqsProcess) -> None:
    try:
        with Client("127.0.0.1", big_kqs.port) as c:
            with pytest.raises(RemoteError) as err:
                c.call("insert", [{"type": "t"}, {"type": "big", "data": "y" * (9 * MiB)}])
            assert err.value.code == "payload_too_large"
            assert "job 1" in err.value.message
            stats = c.call("stats")
        assert stats["accepted"] == 0
        assert stats["live_jobs"] == 0
        assert stats["journal"]["records_written"] == 0
    finally:
        big_kqs.kill()


def test_gc_collects_old_orphans_only(big_kqs: KqsProcess) -> None:
    try:
        with Client("127.0.0.1", big_kqs.port) as c:
            node = c.call("hello")["node"]
            live = c.insert("big", "q" * (100 * 1024))
        wait_fed(big_kqs.port)
        store = FileStore(big_kqs.data_dir / "bulk")
        old, fresh = f"{node}-00000000000000001", f"{node}-00000000000000002"
        foreign = "elsewhere-00000000000000003"

        async def plant() -> None:
            for key in (old, fresh, foreign):
                await store.put(key, b"orphan")

        asyncio.run(plant())
        hour_ago = time.time() - 3600
        for path in bulk_files(big_kqs.data_dir):
            if path.name != file_name(fresh):
                os.utime(path, (hour_ago, hour_ago))
        with Client("127.0.0.1", big_kqs.port) as c:
            assert c.call("gc") == {"collected": 1}
        names = {p.name for p in bulk_files(big_kqs.data_dir)}
        assert len(names) == 3  # the live job's payload, the fresh orphan, the foreign one
        assert any(live in n for n in names)
    finally:
        big_kqs.kill()
