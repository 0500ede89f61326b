"""The bulk store contract: a narrow async interface over bytes, its errors, its keys.

A bulk store keeps job payloads too big for beanstalkd, under a key (the job id). Every
implementation (memory.py, fs.py, mongo.py) keeps the same promises, checked by one
contract test suite (tests/integration/test_store_contract.py):

- `put` is durable once it returns and idempotent by key: putting a key that is already
  stored succeeds and stores nothing (the first copy stays, with its stored time).
- `get` returns exactly the bytes put; a key not stored raises `PayloadMissing`.
- `delete` of a key not stored succeeds.
- `list_older_than(age, now)` returns the keys stored before `now - age` (orphan
  collection); the stored time is taken from the store's clock at `put`.
- Any failure of the store itself (unreachable, timed out, disk error, closed) raises
  `StoreUnavailable`, so callers can keep the job waiting and retry later.
- A key that breaks the key rules raises `ValueError` (a caller bug, not a store state).
"""

from __future__ import annotations

import re
from typing import Protocol

#: Keys are 1 to MAX_KEY_LENGTH printable ASCII characters without space. Job ids
#: (`<node>-<17 hex digits>`, at most 50 characters) always qualify. The cap keeps the
#: file store's escaped file names within NAME_MAX (255 bytes) on every file system.
MAX_KEY_LENGTH = 80
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}")


class StoreError(Exception):
    """Base of the bulk store's errors."""


class PayloadMissing(StoreError):
    """No payload is stored under the key (never put, or deleted)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no payload is stored under key {key!r}")
        self.key = key


class StoreUnavailable(StoreError):
    """The store is unreachable or failed (network, timeout, disk error, closed).

    The operation may or may not have taken effect; every operation is safe to retry.
    """


def check_key(key: str) -> str:
    """Return `key` if it is a valid store key; raise ValueError saying why if not."""
    if not isinstance(key, str):
        raise ValueError(f"a bulk store key must be a str, got {type(key).__name__}")
    if _KEY.fullmatch(key) is None:
        raise ValueError(
            f"bad bulk store key {key!r}: it must be 1-{MAX_KEY_LENGTH} printable ASCII "
            "characters without space"
        )
    return key


class BulkStore(Protocol):
    """Payload bytes by key. Coroutines run on the caller's event loop; none blocks it."""

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, durably, before returning. If `key` is already
        stored this is a successful no-op (the stored bytes are not compared)."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`; PayloadMissing if none are."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key` and its bytes; a key not stored is fine."""
        ...

    async def list_older_than(self, age_seconds: float, now: float) -> list[str]:
        """Keys (sorted) whose put happened before `now - age_seconds` (epoch seconds)."""
        ...

    async def close(self) -> None:
        """Release connections; later calls raise StoreUnavailable. Closing twice is fine."""
        ...
