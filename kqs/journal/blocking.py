"""The journal's blocking steps, each run whole in its worker thread (or at start-up).

Every OS call goes through the `DiskIO` seam. A failure becomes JournalFailed naming
the step, except a full disk while creating or writing, which undoes the batch and
raises NoSpace so that the journal can refuse inserts and go on.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from kqs.errors import JournalFailed
from kqs.journal import segment
from kqs.journal.diskio import DiskIO

RESERVE_BYTES = 2**20
"""Disk kept in `<dir>/reserve` and freed when the disk fills, so finishes still fit."""
RESERVE_NAME = "reserve"
UNTIL_RESTART = "the server accepts no more writes until restarted"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpace(Exception):
    """The disk is full; the batch left nothing behind (see `commit_io`)."""


def make_reserve(io: DiskIO, directory: Path) -> bool:
    """Write `<dir>/reserve` (RESERVE_BYTES, fsynced) unless it exists; False on ENOSPC."""
    path = directory / RESERVE_NAME
    if path.exists():
        return True
    tmp = directory / (RESERVE_NAME + ".tmp")
    try:
        fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            segment.append(io, fd, bytes(RESERVE_BYTES))
            io.fsync(fd)
        finally:
            io.close(fd)
        io.rename(tmp, path)
        io.fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            io.unlink(tmp)
        if exc.errno in NO_SPACE:
            return False
        raise
    return True


def space_back(io: DiskIO, directory: Path) -> bool:
    """Worker: True once there is room for the reserve and as much again, and the
    reserve is made."""
    if io.free_bytes(directory) < 4 * RESERVE_BYTES:
        return False
    return make_reserve(io, directory)


def commit_io(
    io: DiskIO, directory: Path, fd: int | None, number: int, offset: int, buf: bytes
) -> int:
    """Worker: append `buf` at `offset` of segment `number` (created first when `fd` is
    None) and fsync it once. Returns the descriptor.

    A full disk while creating or writing (ENOSPC, EDQUOT) undoes the batch (the new
    segment is removed, or the file cut back to `offset`) and raises NoSpace: nothing
    is half-written and the journal goes on. Any other failure, every fsync failure,
    and a failed undo (the file would no longer match the offsets the journal keeps)
    raise JournalFailed naming the step."""
    step = "segment create"
    created: int | None = None
    try:
        if fd is None:
            fd = created = segment.create(io, directory, number)
        step = "write"
        segment.append(io, fd, buf)
        step = "fsync"
        io.fsync(fd)
    except OSError as exc:
        if step != "fsync" and exc.errno in NO_SPACE:
            _undo(io, directory, number, created, fd, offset, exc)
            raise NoSpace(str(exc)) from exc
        if created is not None:
            with contextlib.suppress(OSError):
                io.close(created)
        raise JournalFailed(f"journal {step} failed: {exc}; {UNTIL_RESTART}") from exc
    return fd


def _undo(
    io: DiskIO,
    directory: Path,
    number: int,
    created: int | None,
    fd: int | None,
    offset: int,
    cause: OSError,
) -> None:
    """Undo a batch that found the disk full (`cause`): remove the segment it created,
    or cut the file back to `offset`. JournalFailed if that fails."""
    try:
        if created is not None:
            io.close(created)
            io.unlink(segment.path_of(directory, number))
        elif fd is not None:
            io.ftruncate(fd, offset)
    except OSError as exc:
        raise JournalFailed(
            f"journal write failed: {cause}, and undoing it failed: {exc}; {UNTIL_RESTART}"
        ) from exc


def delete_io(io: DiskIO, directory: Path, doomed: list[tuple[int, int | None]]) -> None:
    """Worker: delete segments in the order given, each made durable before the next."""
    try:
        for number, fd in doomed:
            segment.delete(io, directory, number, fd)
    except OSError as exc:
        raise JournalFailed(f"journal segment delete failed: {exc}; {UNTIL_RESTART}") from exc


def read_io(io: DiskIO, spans: list[tuple[int, int, int]]) -> list[bytes]:
    """Worker: read each (fd, offset, length)."""
    return [segment.read_exact(io, fd, offset, length) for fd, offset, length in spans]


def close_io(io: DiskIO, fds: list[int]) -> None:
    """Worker or start-up: close descriptors, ignoring errors (nothing to flush)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            io.close(fd)
