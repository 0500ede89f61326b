"""Choosing a bulk store by URL.

    file:///var/lib/kqs/bulk    FileStore in that directory
    file:relative/dir           FileStore in data_dir/relative/dir (default: file:bulk)
    mongodb://host:port/db?...  MongoStore (GridFS); mongodb+srv:// too
    memory://                   MemoryStore (tests)

The empty string means DEFAULT_URL.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.store.base import BulkStore
from kqs.store.fs import FileStore
from kqs.store.memory import MemoryStore

DEFAULT_URL = "file:bulk"
SCHEMES = ("file", "mongodb", "mongodb+srv", "memory")
_EXAMPLES = "file:///var/lib/kqs/bulk, file:bulk, mongodb://host:27017/kqs, memory://"


def open_store(url: str, *, data_dir: Path, clock: Clock = SYSTEM_CLOCK) -> BulkStore:
    """The store `url` names (see the module docstring); nothing is opened or connected
    until the first call. `clock` stamps puts. Raises ValueError for a URL that is
    malformed or of an unsupported scheme, naming the supported ones."""
    url = url or DEFAULT_URL
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "file":
        return FileStore(file_store_dir(url, data_dir=data_dir), clock=clock)
    if scheme in ("mongodb", "mongodb+srv"):
        from kqs.store.mongo import open_mongo_store  # pymongo only when used

        return open_mongo_store(url, clock=clock)
    if scheme == "memory":
        if url.lower() not in ("memory:", "memory://"):
            raise ValueError(f"bad bulk store URL {url!r}: memory:// takes nothing after it")
        return MemoryStore(clock=clock)
    raise ValueError(
        f"unsupported bulk store URL {redact(url)!r}: the scheme must be one of "
        f"{', '.join(s + ':' for s in SCHEMES)} (e.g. {_EXAMPLES})"
    )


def file_store_dir(url: str, *, data_dir: Path) -> Path:
    """The directory of a `file:` URL: an absolute path as is, a relative one under
    `data_dir`. Raises ValueError for a host other than localhost, a query, a fragment
    or an empty path."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"bad bulk store URL {url!r}: a file: URL takes no query or fragment")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"bad bulk store URL {url!r}: host {parts.netloc!r} is not allowed; write "
            "file:///absolute/dir or file:relative/dir"
        )
    path = unquote(parts.path)
    if not path:
        raise ValueError(f"bad bulk store URL {url!r}: no directory given")
    directory = Path(path)
    return directory if directory.is_absolute() else data_dir / directory


def redact(url: str) -> str:
    """`url` with the password of its user info replaced by `***` (for messages)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
