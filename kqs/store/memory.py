"""The in-memory twin of the bulk stores: for unit tests of the feeder and the runners.

It keeps the same contract as the real stores and has one failure seam: set
`unavailable = True` and every call raises StoreUnavailable until it is set back.
"""

from __future__ import annotations

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.store.base import PayloadMissing, StoreUnavailable, check_key


class MemoryStore:
    """A dict of key -> (bytes, stored time). Nothing survives the process."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._items: dict[str, tuple[bytes, float]] = {}
        self._closed = False
        #: Failure seam: while True, every operation raises StoreUnavailable.
        self.unavailable = False
        #: How many puts actually stored bytes (idempotent puts do not count).
        self.writes = 0

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._items)} keys)"

    def _check(self) -> None:
        """Raise StoreUnavailable if the store is closed or made unavailable."""
        if self._closed:
            raise StoreUnavailable("memory store: closed")
        if self.unavailable:
            raise StoreUnavailable("memory store: unavailable (test seam)")

    async def put(self, key: str, data: bytes) -> None:
        """Store a copy of `data` under `key` unless the key is already stored."""
        check_key(key)
        self._check()
        if key not in self._items:
            self._items[key] = (bytes(data), self._clock.time())
            self.writes += 1

    async def get(self, key: str) -> bytes:
        """The bytes under `key`; PayloadMissing if none."""
        check_key(key)
        self._check()
        try:
            return self._items[key][0]
        except KeyError:
            raise PayloadMissing(key) from None

    async def delete(self, key: str) -> None:
        """Forget `key`; a missing key is fine."""
        check_key(key)
        self._check()
        self._items.pop(key, None)

    async def list_older_than(self, age_seconds: float, now: float) -> list[str]:
        """Keys put before `now - age_seconds`, sorted."""
        self._check()
        cutoff = now - age_seconds
        return sorted(key for key, (_, stored) in self._items.items() if stored < cutoff)

    async def close(self) -> None:
        """Mark closed; the contents are kept (a closed twin is still inspectable)."""
        self._closed = True

    def keys(self) -> list[str]:
        """The stored keys, sorted (for test assertions)."""
        return sorted(self._items)
