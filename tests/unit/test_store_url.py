"""Choosing a bulk store by URL: schemes, file paths, errors (no server is contacted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kqs.store import DEFAULT_URL, FileStore, MemoryStore, file_store_dir, open_store
from kqs.store.mongo import MongoStore
from kqs.store.url import redact

DATA = Path("/srv/kqs-data")


def test_default_is_bulk_under_the_data_dir() -> None:
    for url in ("", DEFAULT_URL, "file:bulk"):
        store = open_store(url, data_dir=DATA)
        assert isinstance(store, FileStore)
        assert store.directory == DATA / "bulk"


@pytest.mark.parametrize(
    ("url", "directory"),
    [
        ("file:///var/lib/kqs/bulk", Path("/var/lib/kqs/bulk")),
        ("file://localhost/var/lib/kqs/bulk", Path("/var/lib/kqs/bulk")),
        ("file:/var/lib/kqs/bulk", Path("/var/lib/kqs/bulk")),
        ("FILE:///x", Path("/x")),
        ("file:relative/dir", DATA / "relative/dir"),
        ("file:with%20space", DATA / "with space"),
    ],
)
def test_file_urls(url: str, directory: Path) -> None:
    assert file_store_dir(url, data_dir=DATA) == directory
    store = open_store(url, data_dir=DATA)
    assert isinstance(store, FileStore)
    assert store.directory == directory


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://otherhost/x", "host 'otherhost' is not allowed"),
        ("file://relative/dir", "host 'relative' is not allowed"),
        ("file:", "no directory"),
        ("file:///x?sync=0", "no query"),
        ("file:///x#frag", "no query or fragment"),
        ("memory://something", "takes nothing"),
    ],
)
def test_bad_urls_of_known_schemes(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url, data_dir=DATA)


@pytest.mark.parametrize(
    "url", ["s3://bucket/x", "/var/lib/kqs/bulk", "bulk", "redis://h:6379", "http://h/"]
)
def test_unknown_schemes_name_the_supported_ones(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported bulk store URL") as caught:
        open_store(url, data_dir=DATA)
    for scheme in ("file:", "mongodb:", "mongodb+srv:", "memory:"):
        assert scheme in str(caught.value)


def test_memory_url() -> None:
    assert isinstance(open_store("memory://", data_dir=DATA), MemoryStore)
    assert isinstance(open_store("memory:", data_dir=DATA), MemoryStore)


def test_mongodb_urls_make_a_mongo_store_without_connecting() -> None:
    async def main() -> None:
        store = open_store("mongodb://h1:27017,h2:27018/payloads?replicaSet=rs0", data_dir=DATA)
        try:
            assert isinstance(store, MongoStore)
            assert store.database == "payloads"
            assert store.write_concern.document == {"w": "majority", "j": True}
        finally:
            await store.close()
        nodb = open_store("mongodb://h1/", data_dir=DATA)
        try:
            assert isinstance(nodb, MongoStore)
            assert nodb.database == "kqs"
        finally:
            await nodb.close()

    asyncio.run(main())


@pytest.mark.parametrize("url", ["mongodb://h/db?w=0", "mongodb://h/db?journal=false&w=0"])
def test_unacknowledged_write_concern_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="must be acknowledged"):
        open_store(url, data_dir=DATA)


def test_bad_mongodb_url_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError, match="bad MongoDB bulk store URL") as caught:
        open_store("mongodb://kqs:s3cret@h/db?notAnOption=1&w=majority&ssl=maybe", data_dir=DATA)
    assert "s3cret" not in str(caught.value)


def test_redact_hides_only_the_password() -> None:
    assert redact("mongodb://u:p@h:1/db?w=1") == "mongodb://u:***@h:1/db?w=1"
    assert redact("mongodb://u@h/db") == "mongodb://u@h/db"
    assert redact("mongodb://h/db") == "mongodb://h/db"
    with pytest.raises(ValueError, match="unsupported") as caught:
        open_store("s3://key:secret@bucket/x", data_dir=DATA)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["mongodb://h/db?serverSelectionTimoutMS=100", "mongodb://h/db?w=majority&journal=maybe"]
)
def test_unknown_or_invalid_mongodb_options_are_errors(url: str) -> None:
    with pytest.raises(ValueError, match="bad MongoDB bulk store URL"):
        open_store(url, data_dir=DATA)


def test_a_write_concern_keyword_overrides_the_url() -> None:
    from pymongo.write_concern import WriteConcern

    from kqs.store.mongo import open_mongo_store

    async def main() -> None:
        store = open_mongo_store("mongodb://h/db?w=1", write_concern=WriteConcern(w=2, j=True))
        try:
            assert store.write_concern.document == {"w": 2, "j": True}
        finally:
            await store.close()
        with pytest.raises(ValueError, match="must be acknowledged"):
            open_mongo_store("mongodb://h/db", write_concern=WriteConcern(w=0))

    asyncio.run(main())
