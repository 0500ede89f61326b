"""What a handler gets from a reserved body: bytes for `$base64`, bulk payloads fetched;
and where a runner finds a server's beanstalkd."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from kqs.runner.link import beanstalkd_address
from kqs.runner.outcome import Outcome
from kqs.runner.payload import BulkStores, is_reference, load_body, python_data, with_bytes
from kqs.store import MemoryStore, StoreUnavailable


def test_base64_objects_become_bytes_at_any_depth() -> None:
    data = {"a": {"$base64": "aGVsbG8="}, "b": [{"$base64": ""}, 1, {"x": {"$base64": "AA=="}}]}
    assert with_bytes(data) == {"a": b"hello", "b": [b"", 1, {"x": b"\x00"}]}
    assert with_bytes({"$base64": "aGVsbG8="}) == b"hello"


@pytest.mark.parametrize(
    "value",
    [
        {"$base64": "not base64!"},
        {"$base64": "aGVsbG8="[:-1]},
        {"$base64": 3},
        {"$base64": "aGVsbG8=", "other": 1},
        "plain",
        None,
    ],
)
def test_other_values_are_left_alone(value: object) -> None:
    assert with_bytes(value) == value


def test_the_walk_is_skipped_when_the_body_has_no_base64() -> None:
    sentinel = {"$base64": "aGVsbG8="}
    assert python_data(b'{"data": 1}', sentinel) is sentinel
    assert python_data(b'{"data": {"$base64": "aGVsbG8="}}', sentinel) == b"hello"


def test_references() -> None:
    assert is_reference({"id": "n-1", "type": "t", "bulk": 70000, "ttr": 30})
    assert not is_reference({"id": "n-1", "type": "t", "data": {"bulk": 1}})


def test_load_body_from_the_store() -> None:
    async def test() -> None:
        store = MemoryStore()
        body = {"id": "n-1", "type": "t", "data": "x" * 100_000, "ttr": 30}
        await store.put("n-1", orjson.dumps(body))
        loaded = await load_body(store, "n-1")
        assert not isinstance(loaded, Outcome)
        assert loaded[1] == body
        missing = await load_body(store, "n-2")
        assert isinstance(missing, Outcome) and missing.kind == "dead"
        await store.put("n-3", b"not json")
        assert isinstance(bad := await load_body(store, "n-3"), Outcome) and bad.kind == "dead"
        await store.put("n-4", orjson.dumps({"id": "n-5"}))
        assert isinstance(other := await load_body(store, "n-4"), Outcome)
        assert other.kind == "dead"

        class Down(MemoryStore):
            async def get(self, key: str) -> bytes:
                raise StoreUnavailable("connection refused")

        down = await load_body(Down(), "n-1")
        assert isinstance(down, Outcome) and down.kind == "retry"
        assert down.error == "bulk store unavailable: connection refused"

    asyncio.run(test())


def test_bulk_stores_are_opened_once_per_url_and_relative_file_urls_refused() -> None:
    opened: list[str] = []

    def opener(url: str) -> MemoryStore:
        opened.append(url)
        return MemoryStore()

    stores = BulkStores(opener)
    assert stores.get("memory://") is stores.get("memory://")
    assert opened == ["memory://"]
    with pytest.raises(ValueError, match="relative to its data directory"):
        BulkStores().get("file:bulk")
    assert BulkStores().get("file:///tmp/kqs-bulk-test") is not None


@pytest.mark.parametrize(
    ("reported", "server_host", "expected"),
    [
        ("127.0.0.1:4000", "127.0.0.1", ("127.0.0.1", 4000)),
        ("127.0.0.1:4000", "kqs1.example", ("kqs1.example", 4000)),
        ("0.0.0.0:4000", "10.0.0.5", ("10.0.0.5", 4000)),
        ("[::1]:4000", "10.0.0.5", ("10.0.0.5", 4000)),
        ("localhost:4000", "10.0.0.5", ("10.0.0.5", 4000)),
        ("10.0.0.9:4000", "10.0.0.5", ("10.0.0.9", 4000)),
        ("bs.example:11300", "localhost", ("bs.example", 11300)),
    ],
)
def test_beanstalkd_address_as_seen_from_the_runner(
    reported: str, server_host: str, expected: tuple[str, int]
) -> None:
    assert beanstalkd_address(reported, server_host) == expected


def test_beanstalkd_address_must_be_host_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        beanstalkd_address("nonsense", "h")
