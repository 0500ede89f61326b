"""The bulk store: payloads too big for beanstalkd, by key, as bytes.

`open_store(url, data_dir=...)` picks the implementation (file, MongoDB GridFS, memory);
base.py holds the contract every implementation keeps. See docs/bulk-store.md.
"""

from kqs.store.base import (
    MAX_KEY_LENGTH,
    BulkStore,
    PayloadMissing,
    StoreError,
    StoreUnavailable,
    check_key,
)
from kqs.store.fs import FileStore
from kqs.store.memory import MemoryStore
from kqs.store.url import DEFAULT_URL, SCHEMES, file_store_dir, open_store

__all__ = [
    "DEFAULT_URL",
    "MAX_KEY_LENGTH",
    "SCHEMES",
    "BulkStore",
    "FileStore",
    "MemoryStore",
    "PayloadMissing",
    "StoreError",
    "StoreUnavailable",
    "check_key",
    "file_store_dir",
    "open_store",
]
