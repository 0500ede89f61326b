"""From the body a runner reserved to the job its handler gets: bulk payloads fetched,
`{"$base64": ...}` turned into bytes for Python handlers (docs/protocol.md).

A body too big for beanstalkd is fed as a reference,
`{"id": ..., "type": ..., "bulk": <bytes>, "ttr": ...}`, and the full body is kept in the
owning server's bulk store under the job id (the store URL comes with `hello`).
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from kqs.runner.outcome import Outcome, describe
from kqs.store import BulkStore, PayloadMissing, StoreUnavailable, open_store

log = logging.getLogger("kqs.runner")

BASE64_KEY = "$base64"
_BASE64_MARK = b'"$base64"'


def is_reference(body: dict[str, Any]) -> bool:
    """True for a bulk reference (the payload is in the bulk store)."""
    return "bulk" in body and "data" not in body


def with_bytes(value: Any) -> Any:
    """`value` with every object `{"$base64": "<base64>"}` (that single key, valid
    base64) replaced by its bytes, at any depth; other values unchanged."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(BASE64_KEY), str):
            try:
                return binascii.a2b_base64(value[BASE64_KEY], strict_mode=True)
            except binascii.Error:
                return value
        return {k: with_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_bytes(v) for v in value]
    return value


def python_data(raw: bytes, data: Any) -> Any:
    """The `data` a Python handler gets from a body whose bytes are `raw` (only walked
    when the bytes mention "$base64" at all)."""
    return with_bytes(data) if _BASE64_MARK in raw else data


class BulkStores:
    """The bulk stores named by the servers' `hello`, opened on first use, by URL."""

    def __init__(self, opener: Callable[[str], BulkStore] | None = None) -> None:
        self._open = opener or _open
        self._stores: dict[str, BulkStore] = {}

    def get(self, url: str) -> BulkStore:
        """The store for `url`; ValueError if the runner cannot use that URL."""
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = self._open(url)
        return store

    async def close(self) -> None:
        for store in self._stores.values():
            try:
                await store.close()
            except Exception:
                log.exception("closing a bulk store")
        self._stores.clear()


def _open(url: str) -> BulkStore:
    parts = urlsplit(url)
    if parts.scheme.lower() == "file" and not parts.path.startswith("/"):
        raise ValueError(
            f"the server's bulk store URL {url!r} is relative to its data directory; give"
            " it an absolute bulk_store URL that runners can reach"
        )
    return open_store(url, data_dir=Path("/"))


async def load_body(store: BulkStore, job_id: str) -> tuple[bytes, dict[str, Any]] | Outcome:
    """The full body of a job fed as a reference (its bytes, and parsed), or the outcome
    of failing to get it: retry while the store is unavailable, dead if it is gone."""
    try:
        raw = await store.get(job_id)
    except StoreUnavailable as exc:
        return Outcome.retry(f"bulk store unavailable: {exc}")
    except PayloadMissing:
        return Outcome.dead("its bulk payload is missing from the bulk store")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Outcome.dead(f"its bulk payload is not a job body: {describe(exc)}")
    if not isinstance(body, dict) or body.get("id") != job_id:
        return Outcome.dead("its bulk payload is not this job's body")
    return raw, body
