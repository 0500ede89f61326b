"""The MongoDB store against a real mongod: failure and recovery, stale chunks, options."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient, WriteConcern, monitoring

from kqs.store import BulkStore, PayloadMissing, StoreUnavailable, open_store
from kqs.store.mongo import MongoStore
from tests.mongo import MongodProcess, unique_database
from tests.support import free_port

MiB = 2**20


async def fails_quickly(call: Awaitable[object], *, within: float) -> float:
    """Await `call`, expecting StoreUnavailable within `within` seconds; return the time."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(call, timeout=within + 5)  # a hang fails, not blocks
    elapsed = time.monotonic() - start
    assert elapsed < within, f"took {elapsed:.1f}s"
    return elapsed


def test_a_dead_mongod_raises_store_unavailable_and_a_restarted_one_has_the_data(
    tmp_path: Path,
) -> None:
    server = MongodProcess(tmp_path / "db")
    server.start()
    before = os.urandom(2 * MiB)

    async def main() -> None:
        store = open_store(server.url("kqs"), data_dir=tmp_path)  # default timeouts
        quick = open_store(server.url("kqs", serverSelectionTimeoutMS=500), data_dir=tmp_path)
        try:
            await store.put("before", before)
            server.kill()  # crash: only journaled (j=True) writes survive
            await fails_quickly(store.get("before"), within=6)  # the default: 3 s
            await fails_quickly(quick.put("during", b"x"), within=2)
            await fails_quickly(quick.get("before"), within=2)
            await fails_quickly(quick.delete("before"), within=2)
            await fails_quickly(quick.list_older_than(0, now=time.time()), within=2)

            server.start()  # same dbpath, same port; the same store objects go on
            assert await store.get("before") == before
            assert await quick.get("before") == before
            await store.put("after", b"y")
            assert await quick.get("after") == b"y"
            with pytest.raises(PayloadMissing):
                await store.get("during")
        finally:
            await store.close()
            await quick.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


# pymongo 4.20's async connect closes its socket on a timeout or an OSError, not when it
# is cancelled, which closing the client does to a connect still in progress: the socket
# is left to the garbage collector, which warns.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_server_selection_timeout_is_taken_from_the_url(tmp_path: Path) -> None:
    url = f"mongodb://127.0.0.1:{free_port()}/kqs?serverSelectionTimeoutMS=300"

    async def main() -> None:
        store = open_store(url, data_dir=tmp_path)
        try:
            assert await fails_quickly(store.put("k", b"x"), within=2) >= 0.25
            await fails_quickly(store.get("k"), within=2)
        finally:
            await store.close()

    asyncio.run(main())
    gc.collect()  # here, under this test's warning filter


def _client(url: str) -> MongoClient[dict[str, Any]]:
    return MongoClient(url)


def test_put_after_an_interrupted_put_replaces_its_stale_chunks(
    mongod: MongodProcess, tmp_path: Path
) -> None:
    url = mongod.url(unique_database())
    client = _client(url)
    chunks = client.get_default_database()["bulk.chunks"]
    # What a put killed mid-upload leaves: chunks, no files document.
    chunks.insert_many([{"files_id": "k", "n": n, "data": b"stale" * 100} for n in range(3)])
    data = os.urandom(600_000)  # three chunks of 255 KiB, colliding with the stale ones

    async def main() -> None:
        store = open_store(url, data_dir=tmp_path)
        try:
            with pytest.raises(PayloadMissing):
                await store.get("k")
            await store.put("k", data)
            assert await store.get("k") == data
            await store.delete("k")
        finally:
            await store.close()

    try:
        asyncio.run(main())
        assert chunks.count_documents({}) == 0  # delete removed every chunk
    finally:
        client.close()


def test_files_are_keyed_by_id_with_stored_at_metadata(
    mongod: MongodProcess, tmp_path: Path
) -> None:
    url = mongod.url(unique_database())

    async def body(store: BulkStore) -> None:
        await store.put("n1-0000000000000001a", b"payload")

    async def main() -> None:
        store = open_store(url, data_dir=tmp_path)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())
    client = _client(url)
    try:
        doc = client.get_default_database()["bulk.files"].find_one()
        assert doc is not None
        assert doc["_id"] == doc["filename"] == "n1-0000000000000001a"
        assert doc["length"] == len(b"payload")
        assert abs(doc["metadata"]["stored_at"] - time.time()) < 60
    finally:
        client.close()


def test_write_concern_majority_journaled_by_default_and_from_the_url(tmp_path: Path) -> None:
    async def main() -> None:
        default = open_store("mongodb://127.0.0.1:1/db1", data_dir=tmp_path)
        custom = open_store("mongodb://127.0.0.1:1/db2?w=1&journal=false", data_dir=tmp_path)
        try:
            assert isinstance(default, MongoStore)
            assert isinstance(custom, MongoStore)
            assert default.write_concern.document == {"w": "majority", "j": True}
            assert default.database == "db1"
            assert custom.write_concern.document == {"w": 1, "j": False}
        finally:
            await default.close()
            await custom.close()

    asyncio.run(main())


def test_an_interrupted_delete_is_listed_and_finished_by_the_next_delete(
    mongod: MongodProcess, tmp_path: Path
) -> None:
    url = mongod.url(unique_database())

    async def main() -> None:
        store = open_store(url, data_dir=tmp_path)
        try:
            await store.put("k", os.urandom(300_000))
            client = _client(url)
            try:  # what a delete killed between its two steps leaves: no chunks
                client.get_default_database()["bulk.chunks"].delete_many({"files_id": "k"})
            finally:
                client.close()
            with pytest.raises(StoreUnavailable, match="CorruptGridFile"):
                await store.get("k")
            assert await store.list_older_than(0, now=time.time() + 60) == ["k"]
            await store.delete("k")
            assert await store.list_older_than(0, now=time.time() + 60) == []
            with pytest.raises(PayloadMissing):
                await store.get("k")
        finally:
            await store.close()

    asyncio.run(main())


class WriteLog(monitoring.CommandListener):
    """The write commands a client sends, with their write concern."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "update", "delete"):
            self.writes.append((event.command_name, event.command.get("writeConcern")))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_a_put_that_finds_its_file_waits_for_the_write_concern(mongod: MongodProcess) -> None:
    """A file found by a re-put may come from a put that crashed before its write concern
    was met: the re-put makes a write with that concern before it says stored."""
    log = WriteLog()

    async def main() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            mongod.url(), event_listeners=[log]
        )
        concern = WriteConcern("majority", j=True)
        database = client[unique_database()].with_options(write_concern=concern)
        store = MongoStore(client, database)
        try:
            await store.put("k", b"payload")
            log.writes.clear()
            await store.put("k", b"payload")
        finally:
            await store.close()

    asyncio.run(main())
    assert log.writes == [("update", {"w": "majority", "j": True})]
