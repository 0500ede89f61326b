"""The MongoDB store: payloads in GridFS, for bulk data shared across machines.

Built on pymongo's native asyncio API (`pymongo.AsyncMongoClient` and
`gridfs.AsyncGridFSBucket`, GA since pymongo 4.13 and the successor of Motor): no
thread pool, cancellation and timeouts behave like any other coroutine. A store and its
client belong to the event loop that first uses them.

Layout: bucket `bulk` in the URL's database (default `kqs`), i.e. the collections
`bulk.files` and `bulk.chunks`. A payload is one GridFS file whose `_id` and filename
are the key and whose `metadata.stored_at` is the store clock's time at put (what
`list_older_than` queries; an index on it is made at the first such call).

- put: if a file with `_id == key` exists, nothing is done. Otherwise chunks left by an
  interrupted put of that key are removed and the file is uploaded (chunks first, the
  files document last, so a file document always means a whole file). Writes use the
  URL's write concern, by default `w=majority, journal=true`; an unacknowledged write
  concern (`w=0`) is refused. Concurrent puts of one key are not supported (a key is
  a job id, written by the one feeder that owns the job).
- delete: chunks first, then the files document, so no chunk is ever left without a
  document to find it by; an interrupted delete leaves a document that
  `list_older_than` still lists.
- Every pymongo error becomes StoreUnavailable (NoFile on get becomes PayloadMissing).
  Default timeouts keep a dead server from hanging callers: serverSelectionTimeoutMS
  and connectTimeoutMS 3000, socketTimeoutMS 30000; any of them can be set in the URL.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.store.base import PayloadMissing, StoreUnavailable, check_key
from kqs.store.url import redact

DEFAULT_DATABASE = "kqs"
BUCKET = "bulk"
#: Client options kqs sets when the URL does not: lower-cased URL name -> (kwarg, value).
DEFAULT_OPTIONS: dict[str, tuple[str, Any]] = {
    "serverselectiontimeoutms": ("serverSelectionTimeoutMS", 3000),
    "connecttimeoutms": ("connectTimeoutMS", 3000),
    "sockettimeoutms": ("socketTimeoutMS", 30000),
    "w": ("w", "majority"),
    "journal": ("journal", True),
}

Document = dict[str, Any]


def open_mongo_store(
    url: str, *, clock: Clock = SYSTEM_CLOCK, write_concern: WriteConcern | None = None
) -> MongoStore:
    """A MongoStore for a `mongodb://` or `mongodb+srv://` URL. kqs's defaults fill the
    options the URL leaves out (DEFAULT_OPTIONS); `write_concern`, if given, overrides
    the URL's. Does not connect. Raises ValueError for a bad URL (including an unknown
    or invalid option, of which pymongo would only warn) or an unacknowledged write
    concern."""
    query = {name.lower(): value for name, value in parse_qsl(urlsplit(url).query, True)}
    unacknowledged = ValueError(
        f"MongoDB bulk store URL {redact(url)!r}: the write concern must be acknowledged "
        "(w=0 cannot confirm that a payload is stored)"
    )
    if write_concern is None and query.get("w") == "0":
        raise unacknowledged
    defaults = {kw: value for name, (kw, value) in DEFAULT_OPTIONS.items() if name not in query}
    if write_concern is not None:
        defaults.pop("w", None)
        defaults.pop("journal", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pymongo only warns of unknown options
            client: AsyncMongoClient[Document] = AsyncMongoClient(url, **defaults)
        database = client.get_default_database(default=DEFAULT_DATABASE)
    except (ConfigurationError, ValueError, TypeError, Warning) as exc:
        raise ValueError(f"bad MongoDB bulk store URL {redact(url)!r}: {exc}") from exc
    if write_concern is not None:
        database = database.with_options(write_concern=write_concern)
    if not database.write_concern.acknowledged:
        raise unacknowledged  # the client never connected: nothing to close
    return MongoStore(client, database, where=redact(url), clock=clock)


class MongoStore:
    """Payloads as GridFS files in `database` (bucket BUCKET); owns `client`."""

    def __init__(
        self,
        client: AsyncMongoClient[Document],
        database: AsyncDatabase[Document],
        *,
        where: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Use `database` (with its write concern) of `client`; close() closes the client."""
        self._client = client
        self._db = database
        self._where = where or database.name
        self._clock = clock
        self._bucket = AsyncGridFSBucket(database, bucket_name=BUCKET)
        self._files: AsyncCollection[Document] = database[f"{BUCKET}.files"]
        self._chunks: AsyncCollection[Document] = database[f"{BUCKET}.chunks"]
        self._indexed = False
        self._closed = False

    def __repr__(self) -> str:
        return f"MongoStore({self._where!r}, database={self._db.name!r})"

    @property
    def database(self) -> str:
        """Name of the database holding the bucket."""
        return self._db.name

    @property
    def write_concern(self) -> WriteConcern:
        """The write concern every put and delete uses."""
        return self._db.write_concern

    async def put(self, key: str, data: bytes) -> None:
        """Upload `data` as the GridFS file `_id == key`, unless that file exists."""
        check_key(key)
        self._check_open()
        stored_at = self._clock.time()
        with self._errors("put", key):
            if await self._exists(key):
                # Found, but maybe written by a put that crashed before its write concern
                # was met: a no-op write with the store's write concern returns only once
                # everything before it (that upload too) is as durable as a put's.
                await self._files.update_one({"_id": key}, {"$setOnInsert": {"_id": key}})
                return
            await self._chunks.delete_many({"files_id": key})  # of an interrupted put
            try:
                await self._bucket.upload_from_stream_with_id(
                    key, key, data, metadata={"stored_at": stored_at}
                )
            except DuplicateKeyError:
                if not await self._exists(key):
                    raise

    async def get(self, key: str) -> bytes:
        """The bytes of the GridFS file `_id == key`; PayloadMissing if there is none."""
        check_key(key)
        self._check_open()
        with self._errors("get", key):
            try:
                stream = await self._bucket.open_download_stream(key)
            except NoFile:
                raise PayloadMissing(key) from None
            async with stream:
                return await stream.read()

    async def delete(self, key: str) -> None:
        """Remove the file's chunks, then its document; a missing key is fine."""
        check_key(key)
        self._check_open()
        with self._errors("delete", key):
            await self._chunks.delete_many({"files_id": key})
            await self._files.delete_one({"_id": key})

    async def list_older_than(self, age_seconds: float, now: float) -> list[str]:
        """Keys whose `metadata.stored_at` is before `now - age_seconds`, sorted."""
        self._check_open()
        with self._errors("list", "*"):
            if not self._indexed:
                await self._files.create_index([("metadata.stored_at", ASCENDING)])
                self._indexed = True
            cursor = self._files.find(
                {"metadata.stored_at": {"$lt": now - age_seconds}}, {"_id": 1}
            )
            keys = [doc["_id"] async for doc in cursor]
        return sorted(key for key in keys if isinstance(key, str))

    async def close(self) -> None:
        """Close the client (its connections and monitors); closing twice is fine."""
        if not self._closed:
            self._closed = True
            await self._client.close()

    # -- private

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"mongo store {self._where}: closed")

    async def _exists(self, key: str) -> bool:
        """Whether the files document of `key` exists (the file is whole)."""
        return await self._files.find_one({"_id": key}, {"_id": 1}) is not None

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Turn any pymongo error inside the block into StoreUnavailable."""
        try:
            yield
        except PyMongoError as exc:
            raise StoreUnavailable(
                f"mongo store {self._where}: {op} {key!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
