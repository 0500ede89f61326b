"""The bulk store contract, run against every implementation: memory, file (tmp_path)
and MongoDB GridFS (a real mongod). See kqs/store/base.py for the contract."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from kqs.clock import SYSTEM_CLOCK, Clock, ManualClock
from kqs.store import BulkStore, MemoryStore, PayloadMissing, StoreUnavailable, open_store
from kqs.store.fs import key_of
from tests.mongo import MongodProcess, unique_database

MiB = 2**20


@dataclass
class Backend:
    """One implementation under test: its URL and how to count stored copies of a key."""

    kind: str
    url: str
    data_dir: Path
    copies: Callable[[BulkStore, str], int]
    durable: bool  # a new store on the same URL sees the data

    def run(
        self, body: Callable[[BulkStore], Awaitable[None]], *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        """Open the store, run `body` with it on a fresh event loop, close it."""

        async def main() -> None:
            store = open_store(self.url, data_dir=self.data_dir, clock=clock)
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())


def memory_copies(store: BulkStore, key: str) -> int:
    assert isinstance(store, MemoryStore)
    return store.keys().count(key)


def file_copies(directory: Path) -> Callable[[BulkStore, str], int]:
    def copies(store: BulkStore, key: str) -> int:
        names = os.listdir(directory)
        assert not [n for n in names if n.startswith(".")], f"temp files left: {names}"
        return sum(1 for name in names if key_of(name) == key)

    return copies


def mongo_copies(url: str) -> Callable[[BulkStore, str], int]:
    def copies(store: BulkStore, key: str) -> int:
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        try:
            db = client.get_default_database()
            files = list(db["bulk.files"].find({"filename": key}))
            for doc in files:
                chunks = db["bulk.chunks"].count_documents({"files_id": doc["_id"]})
                assert chunks == math.ceil(doc["length"] / doc["chunkSize"])
            return len(files)
        finally:
            client.close()

    return copies


@pytest.fixture(params=["memory", "file", "mongo"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each implementation in turn; mongo starts the session's mongod only when needed."""
    if request.param == "memory":
        return Backend("memory", "memory://", tmp_path, memory_copies, durable=False)
    if request.param == "file":
        return Backend("file", "file:bulk", tmp_path, file_copies(tmp_path / "bulk"), True)
    mongod: MongodProcess = request.getfixturevalue("mongod")
    url = mongod.url(unique_database())
    return Backend("mongo", url, tmp_path, mongo_copies(url), durable=True)


PAYLOADS = {
    "empty": b"",
    "one-byte": b"\x00",
    "all-bytes": bytes(range(256)) * 3 + b"\r\n\x00\xff",
    "json-ish": b'{"a": [1, 2, "\\u00e9"]}\n',
    "20MiB": os.urandom(20 * MiB),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_put_get_delete_round_trip(backend: Backend, name: str) -> None:
    data = PAYLOADS[name]

    async def body(store: BulkStore) -> None:
        await store.put("n1-018c5e2a1b3c00001", data)
        assert await store.get("n1-018c5e2a1b3c00001") == data
        assert backend.copies(store, "n1-018c5e2a1b3c00001") == 1
        await store.delete("n1-018c5e2a1b3c00001")
        with pytest.raises(PayloadMissing):
            await store.get("n1-018c5e2a1b3c00001")
        assert backend.copies(store, "n1-018c5e2a1b3c00001") == 0

    backend.run(body)


def test_put_is_idempotent_by_key(backend: Backend) -> None:
    first = os.urandom(MiB + 7)

    async def body(store: BulkStore) -> None:
        await store.put("job-1", first)
        await store.put("job-1", first)
        await store.put("job-1", b"other bytes are not stored either")
        assert backend.copies(store, "job-1") == 1
        assert await store.get("job-1") == first

    backend.run(body)


def test_get_of_a_missing_key_raises_payload_missing(backend: Backend) -> None:
    async def body(store: BulkStore) -> None:
        with pytest.raises(PayloadMissing) as caught:
            await store.get("never-put")
        assert caught.value.key == "never-put"
        assert not isinstance(caught.value, StoreUnavailable)

    backend.run(body)


def test_delete_of_a_missing_key_is_fine(backend: Backend) -> None:
    async def body(store: BulkStore) -> None:
        await store.delete("never-put")
        await store.put("k", b"x")
        await store.delete("k")
        await store.delete("k")
        await store.put("k", b"y")  # a deleted key can be put again
        assert await store.get("k") == b"y"

    backend.run(body)


def test_list_older_than_with_injected_now(backend: Backend) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    t0 = clock.time()

    async def body(store: BulkStore) -> None:
        await store.put("old", b"o")
        clock.advance(100)
        await store.put("fresh", b"f")
        assert await store.list_older_than(50, now=t0 + 100) == ["old"]
        assert await store.list_older_than(200, now=t0 + 100) == []
        assert await store.list_older_than(0, now=t0 + 101) == ["fresh", "old"]
        clock.advance(1000)
        await store.put("old", b"again")  # idempotent: keeps its first stored time
        assert await store.list_older_than(50, now=t0 + 100) == ["old"]
        await store.delete("old")
        assert await store.list_older_than(0, now=t0 + 10_000) == ["fresh"]

    backend.run(body, clock=clock)


def test_list_older_than_with_the_system_clock(backend: Backend) -> None:
    async def body(store: BulkStore) -> None:
        await store.put("k1", b"1")
        assert await store.list_older_than(3600, now=time.time()) == []
        assert await store.list_older_than(0, now=time.time() + 60) == ["k1"]

    backend.run(body)


ODD_KEYS = ["a/b", "../x", ".", "..", ".hidden", "%2E", "x%y", "a:b*c?d", "~!@#$^&()[]{}|\\"]


def test_odd_keys_round_trip_and_list(backend: Backend) -> None:
    async def body(store: BulkStore) -> None:
        for i, key in enumerate(ODD_KEYS):
            await store.put(key, str(i).encode())
        for i, key in enumerate(ODD_KEYS):
            assert await store.get(key) == str(i).encode()
        assert await store.list_older_than(0, now=time.time() + 60) == sorted(ODD_KEYS)
        assert await store.list_older_than(0, now=time.time() + 60) == sorted(ODD_KEYS)

    backend.run(body)
    if backend.kind == "file":
        assert sorted(os.listdir(backend.data_dir)) == ["bulk"]  # nothing escaped the dir


@pytest.mark.parametrize("key", ["", "a b", "caf\u00e9", "x" * 81, "tab\t", "nl\n", "nul\x00"])
def test_bad_keys_raise_value_error(backend: Backend, key: str) -> None:
    async def body(store: BulkStore) -> None:
        with pytest.raises(ValueError, match="key"):
            await store.put(key, b"x")
        with pytest.raises(ValueError, match="key"):
            await store.get(key)
        with pytest.raises(ValueError, match="key"):
            await store.delete(key)

    backend.run(body)


def test_the_longest_key_works(backend: Backend) -> None:
    key = "%" * 80  # escapes to the longest file name

    async def body(store: BulkStore) -> None:
        await store.put(key, b"long")
        assert await store.get(key) == b"long"
        assert await store.list_older_than(0, now=time.time() + 60) == [key]

    backend.run(body)


def test_concurrent_puts_and_gets_of_many_keys(backend: Backend) -> None:
    payloads = {f"n-{i:017x}": os.urandom(i * 997) for i in range(64)}

    async def body(store: BulkStore) -> None:
        await asyncio.gather(*(store.put(k, v) for k, v in payloads.items()))
        got = await asyncio.gather(*(store.get(k) for k in payloads))
        assert got == list(payloads.values())
        assert await store.list_older_than(0, now=time.time() + 60) == sorted(payloads)

    backend.run(body)


def test_a_closed_store_raises_store_unavailable(backend: Backend) -> None:
    async def main() -> None:
        store = open_store(backend.url, data_dir=backend.data_dir)
        await store.put("k", b"x")
        await store.close()
        await store.close()  # twice is fine
        for call in (
            store.put("k2", b"y"),
            store.get("k"),
            store.delete("k"),
            store.list_older_than(0, now=time.time()),
        ):
            with pytest.raises(StoreUnavailable):
                await call

    asyncio.run(main())


def test_data_outlives_the_store_object_unless_in_memory(backend: Backend) -> None:
    data = os.urandom(3 * MiB)

    async def gone(store: BulkStore) -> None:
        with pytest.raises(PayloadMissing):
            await store.get("kept")

    async def put(store: BulkStore) -> None:
        await store.put("kept", data)

    async def check(store: BulkStore) -> None:
        assert await store.get("kept") == data
        await store.put("kept", b"ignored")
        assert backend.copies(store, "kept") == 1

    backend.run(put)
    backend.run(check if backend.durable else gone)
