"""The file store: one file per key in a local directory (the default bulk store).

A put writes a temp file in the same directory, sets its modification time to the
store clock's time (the stored time `list_older_than` reads), fsyncs it, renames it to
the key's file name and fsyncs the directory: after a crash a key's file is either
whole or absent. A put that finds the key's file already there fsyncs the directory
too: the put that renamed it may have crashed before its own directory fsync, and the
file's bytes are durable already (it gets its name only after they are fsynced).

Reads and writes go through aiofiles; calls aiofiles lacks (fsync, utime, directory
fsync, the directory scan) run in the loop's default executor, so the event loop never
waits on the disk.

Deletes are not fsynced: a crash can bring a deleted payload back, and orphan
collection (`list_older_than` + `delete`) removes it again.

File names: characters of a key outside `A-Z a-z 0-9 _ . -` (and a leading `.`) are
written as `%XX`, so any valid key is one safe file name that never starts with `.`.
Temp files start with `.tmp.`; leftovers of an interrupted put are removed by
`list_older_than` once they are older than its cutoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import aiofiles
import aiofiles.os

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.store.base import PayloadMissing, StoreUnavailable, check_key

TMP_PREFIX = ".tmp."
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_ESCAPED_NAME = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})(?:[A-Za-z0-9_.-]|%[0-9A-F]{2})*")
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


def file_name(key: str) -> str:
    """The file name of a valid `key`: `%XX` for unsafe characters and a leading dot."""
    check_key(key)
    escaped = "".join(c if c in _PLAIN else f"%{ord(c):02X}" for c in key)
    return "%2E" + escaped[1:] if escaped.startswith(".") else escaped


def key_of(name: str) -> str | None:
    """The key stored in file `name`, or None if `name` is not a key's file (a temp
    file, or anything else found in the directory)."""
    if _ESCAPED_NAME.fullmatch(name) is None:
        return None
    key = re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), name)
    try:
        return key if file_name(key) == name else None
    except ValueError:
        return None


class FileStore:
    """Payloads as files in `directory` (created, with its parents, at the first put)."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        """`fsync` is the failure seam: tests pass one that raises OSError (EIO)."""
        self.directory = directory
        self._clock = clock
        self._fsync = fsync
        self._dir_ready = False
        self._closed = False

    def __repr__(self) -> str:
        return f"FileStore({str(self.directory)!r})"

    async def put(self, key: str, data: bytes) -> None:
        """Write `data` to the key's file atomically and durably, unless it exists; if it
        does, only fsync the directory (the file's bytes were fsynced before its rename)."""
        path = self.directory / file_name(key)
        self._check_open()
        try:
            if await aiofiles.os.path.exists(path):
                # Found, maybe renamed by a put that crashed before its directory fsync:
                # make the name durable before this put reports the payload stored.
                await _run(self._fsync_dir, self.directory)
                return
            await self._ensure_dir()
            tmp = self.directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            stored_ns = int(self._clock.time() * 1e9)
            try:
                async with aiofiles.open(tmp, "xb") as f:
                    await f.write(data)
                    await f.flush()
                    await _run(self._seal, f.fileno(), stored_ns)
                await aiofiles.os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    await aiofiles.os.remove(tmp)
                raise
            await _run(self._fsync_dir, self.directory)
        except OSError as exc:
            raise self._failed("put", key, exc) from exc

    async def get(self, key: str) -> bytes:
        """The content of the key's file; PayloadMissing if there is no such file."""
        path = self.directory / file_name(key)
        self._check_open()
        try:
            async with aiofiles.open(path, "rb") as f:
                return await f.read()
        except FileNotFoundError:
            raise PayloadMissing(key) from None
        except OSError as exc:
            raise self._failed("get", key, exc) from exc

    async def delete(self, key: str) -> None:
        """Unlink the key's file (not fsynced, see the module docstring); missing is fine."""
        path = self.directory / file_name(key)
        self._check_open()
        try:
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._failed("delete", key, exc) from exc

    async def list_older_than(self, age_seconds: float, now: float) -> list[str]:
        """Keys whose file's stored time is before `now - age_seconds`, sorted; temp
        files older than that cutoff are removed on the way."""
        self._check_open()
        try:
            return await _run(self._scan, now - age_seconds)
        except OSError as exc:
            raise self._failed("list", "*", exc) from exc

    async def close(self) -> None:
        """Mark closed (no resources are held between calls)."""
        self._closed = True

    # -- private: blocking helpers run in the executor, and error shaping

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"file store {self.directory}: closed")

    def _failed(self, op: str, key: str, exc: OSError) -> StoreUnavailable:
        return StoreUnavailable(f"file store {self.directory}: {op} {key!r} failed: {exc}")

    async def _ensure_dir(self) -> None:
        """Create the directory (once per store) and make its creation durable."""
        if not self._dir_ready:
            await _run(self._make_dir)
            self._dir_ready = True

    def _make_dir(self) -> None:
        """Blocking: create missing directories down to ours, fsyncing each new entry."""
        missing: list[Path] = []
        path = self.directory
        while not path.exists():
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            self._fsync_dir(path.parent)

    def _seal(self, fd: int, stored_ns: int) -> None:
        """Blocking: set the file's stored time, then fsync its data and metadata."""
        os.utime(fd, ns=(stored_ns, stored_ns))
        self._fsync(fd)

    def _fsync_dir(self, path: Path) -> None:
        """Blocking: make the entries of directory `path` durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _scan(self, cutoff: float) -> list[str]:
        """Blocking: keys stored before `cutoff`; removes temp files older than it."""
        keys: list[str] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return keys
        for entry in entries:
            try:
                stored = entry.stat(follow_symlinks=False).st_mtime_ns / 1e9
                if stored >= cutoff or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.startswith(TMP_PREFIX):
                    os.unlink(entry.path)
                    continue
            except FileNotFoundError:
                continue  # deleted meanwhile
            key = key_of(entry.name)
            if key is not None:
                keys.append(key)
        return sorted(keys)


async def _run(fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
    """Run blocking `fn(*args)` in the running loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
