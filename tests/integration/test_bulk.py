"""Large payloads on a real server: file bulk store, references in beanstalkd, limits, gc."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymongo import MongoClient

from kqs.client import Client, RemoteError
from kqs.clock import SYSTEM_CLOCK, Clock, ManualClock
from kqs.store import open_store
from kqs.store.fs import file_name
from tests.integration.helpers import beanstalk_contents, kqs_stats, wait_fed
from tests.mongo import MongodProcess, unique_database
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


@pytest.fixture(params=["file", "mongo"])
def gc_kqs(
    request: pytest.FixtureRequest, tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> Iterator[tuple[KqsProcess, str]]:
    """A server with a 60 s gc_window on each store, and its bulk store URL."""
    if request.param == "file":
        url = (tmp_path / "data" / "bulk").as_uri()
    else:
        mongod: MongodProcess = request.getfixturevalue("mongod")
        url = mongod.url(unique_database())
    server = KqsProcess(
        tmp_path / "data",
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
        bulk_store=url,
        gc_window=60,
    )
    server.start()
    yield server, url
    server.kill()


def backdate(url: str, data_dir: Path, key: str, when: float) -> None:
    """Make `key`'s stored time `when`, as a payload put then would have it."""
    if url.startswith("file:"):
        os.utime(Path(url.removeprefix("file://")) / file_name(key), (when, when))
        return
    client: MongoClient[dict[str, Any]] = MongoClient(url)
    try:
        files = client.get_default_database()["bulk.files"]
        assert files.update_one({"_id": key}, {"$set": {"metadata.stored_at": when}}).matched_count
    finally:
        client.close()


def stored_keys(url: str, data_dir: Path) -> list[str]:
    """Every key in the store at `url`, sorted."""

    async def main() -> list[str]:
        store = open_store(url, data_dir=data_dir)
        try:
            return await store.list_older_than(0, now=time.time() + 60)
        finally:
            await store.close()

    return asyncio.run(main())


def put_payloads(url: str, data_dir: Path, keys: list[str], *, clock: Clock) -> None:
    """Put `keys` in the store at `url`, stamped by `clock`."""

    async def main() -> None:
        store = open_store(url, data_dir=data_dir, clock=clock)
        try:
            for key in keys:
                await store.put(key, b"orphan")
        finally:
            await store.close()

    asyncio.run(main())


def test_gc_collects_old_orphans_only(gc_kqs: tuple[KqsProcess, str]) -> None:
    """`kqs gc` (the `gc` call) deletes this node's payloads older than gc_window whose
    jobs are finished; fresh orphans, live jobs' payloads (however old) and other
    nodes' payloads stay. On the file store and on GridFS alike."""
    server, url = gc_kqs
    with Client("127.0.0.1", server.port) as c:
        node = c.call("hello")["node"]
        live = c.insert("big", "q" * (100 * 1024))
    wait_fed(server.port)
    old, fresh = f"{node}-00000000000000001", f"{node}-00000000000000002"
    foreign = "elsewhere-00000000000000003"
    hour_ago = time.time() - 3600
    put_payloads(url, server.data_dir, [old, foreign], clock=ManualClock(start=hour_ago))
    put_payloads(url, server.data_dir, [fresh], clock=SYSTEM_CLOCK)
    backdate(url, server.data_dir, live, hour_ago)
    assert stored_keys(url, server.data_dir) == sorted([live, old, fresh, foreign])
    with Client("127.0.0.1", server.port) as c:
        assert c.call("gc") == {"collected": 1}
        assert c.call("gc") == {"collected": 0}
    assert stored_keys(url, server.data_dir) == sorted([live, fresh, foreign])
