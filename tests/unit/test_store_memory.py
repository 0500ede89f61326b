"""The in-memory twin's own seams (its contract is checked in test_store_contract.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from kqs.store import MemoryStore, StoreUnavailable


def test_unavailable_seam_fails_every_call_and_recovers() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.put("k", b"x")
        store.unavailable = True
        for call in (
            store.put("k2", b"y"),
            store.get("k"),
            store.delete("k"),
            store.list_older_than(0, now=time.time()),
        ):
            with pytest.raises(StoreUnavailable):
                await call
        store.unavailable = False
        assert await store.get("k") == b"x"
        assert store.keys() == ["k"]

    asyncio.run(main())


def test_writes_counts_only_puts_that_stored() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.put("a", b"1")
        await store.put("a", b"1")
        await store.put("b", bytearray(b"2"))  # type: ignore[arg-type]  # bytes-like copied
        assert store.writes == 2
        assert await store.get("b") == b"2"
        assert type(await store.get("b")) is bytes

    asyncio.run(main())
