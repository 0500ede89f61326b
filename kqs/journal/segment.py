"""One segment file: its name, creation, appends, reads, repair at start-up, deletion.

A segment is `<dir>/<8-digit number>.seg`, append-only, a plain run of records. This
module reasons about the bytes of one file; journal.py reasons about the set of them.
Every function here does blocking I/O through a `DiskIO`: the journal calls them at
start-up (before serving) or from its worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from kqs.journal.diskio import DiskIO
from kqs.journal.record import BadRange, Record, scan

log = logging.getLogger("kqs.journal")

SUFFIX = ".seg"
TMP_SUFFIX = ".seg.tmp"
QUARANTINE = "quarantine"
TORN = "torn"
_NAME = re.compile(r"(\d{8,})\.seg")
_READ_CHUNK = 16 * 2**20


class Quarantined(NamedTuple):
    """Bad bytes moved out of a segment at replay: where they were and where they are."""

    path: Path  # the quarantine file holding the bytes
    segment: int
    offset: int  # offset of the bad bytes in the segment as it was found
    length: int


@dataclass(slots=True)
class Loaded:
    """A segment after replay repair: its size and what was found in it."""

    number: int
    size: int
    records: int  # valid records, each handed to `load`'s `apply`
    torn_bytes: int = 0
    quarantined: list[Quarantined] = field(default_factory=list)


def name(number: int) -> str:
    """File name of segment `number`."""
    return f"{number:08d}{SUFFIX}"


def path_of(directory: Path, number: int) -> Path:
    return directory / name(number)


def list_numbers(io: DiskIO, directory: Path) -> list[int]:
    """Numbers of the segment files in `directory`, ascending; leftover temp files of an
    interrupted rewrite are deleted (the original segment is still whole)."""
    numbers: list[int] = []
    for entry in io.listdir(directory):
        if entry.endswith(TMP_SUFFIX):
            io.unlink(directory / entry)
            continue
        match = _NAME.fullmatch(entry)
        if match is not None:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def create(io: DiskIO, directory: Path, number: int) -> int:
    """Create segment `number` (it must not exist), fsync the directory, return a
    read/append descriptor."""
    fd = io.open(path_of(directory, number), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND)
    try:
        io.fsync_dir(directory)
    except BaseException:
        io.close(fd)
        raise
    return fd


def open_existing(io: DiskIO, directory: Path, number: int, *, writable: bool) -> int:
    """Open an existing segment: read/append if `writable` (the active one), else read-only."""
    flags = os.O_RDWR | os.O_APPEND if writable else os.O_RDONLY
    return io.open(path_of(directory, number), flags)


def append(io: DiskIO, fd: int, data: bytes) -> None:
    """Write all of `data` at the end of the file (looping over short writes); no fsync.

    OSError if a write fails or takes nothing.
    """
    view = memoryview(data)
    while view:
        written = io.write(fd, view)
        if written <= 0:
            raise OSError(f"write took {written} bytes")
        view = view[written:]


def read_exact(io: DiskIO, fd: int, offset: int, length: int) -> bytes:
    """Exactly `length` bytes at `offset`; OSError if the file ends first."""
    parts: list[bytes] = []
    got = 0
    while got < length:
        chunk = io.pread(fd, length - got, offset + got)
        if not chunk:
            raise OSError(f"segment ends before offset {offset + length} (read {got} bytes)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def delete(io: DiskIO, directory: Path, number: int, fd: int | None) -> None:
    """Close and unlink segment `number`, then fsync the directory so it stays gone."""
    if fd is not None:
        io.close(fd)
    io.unlink(path_of(directory, number))
    io.fsync_dir(directory)


def _read_all(io: DiskIO, path: Path) -> bytes:
    """The whole content of `path`."""
    fd = io.open(path, os.O_RDONLY)
    try:
        size = io.size(fd)
        parts: list[bytes] = []
        offset = 0
        while offset < size:
            chunk = io.pread(fd, min(_READ_CHUNK, size - offset), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)
    finally:
        io.close(fd)


def _write_file(io: DiskIO, path: Path, data: bytes) -> None:
    """Create or replace `path` with `data` and fsync it (the directory is not fsynced)."""
    fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        append(io, fd, data)
        io.fsync(fd)
    finally:
        io.close(fd)


def _truncate(io: DiskIO, path: Path, size: int) -> None:
    """Cut `path` to `size` bytes and fsync it."""
    fd = io.open(path, os.O_RDWR)
    try:
        io.ftruncate(fd, size)
        io.fsync(fd)
    finally:
        io.close(fd)


def _keep(
    io: DiskIO, directory: Path, sub: str, number: int, buf: bytes, bad: list[BadRange]
) -> list[Quarantined]:
    """Copy each bad range durably to `<dir>/<sub>/<segment>-<offset>.bin`.

    A copy never replaces another: if that name holds other bytes (the same offset,
    damaged again after an earlier repair), it gets `-2`, `-3`, ... appended; if it
    holds the same bytes (a repair interrupted before the segment was rewritten), it
    is kept as it is.
    """
    qdir = directory / sub
    io.makedirs(qdir)
    io.fsync_dir(directory)
    names = set(io.listdir(qdir))
    out: list[Quarantined] = []
    for b in bad:
        data = buf[b.start : b.end]
        stem = f"{number:08d}-{b.start}"
        target, n = qdir / f"{stem}.bin", 1
        while target.name in names and _read_all(io, target) != data:
            n += 1
            target = qdir / f"{stem}-{n}.bin"
        if target.name not in names:
            _write_copy(io, target, data)
            names.add(target.name)
        out.append(Quarantined(target, number, b.start, b.length))
    io.fsync_dir(qdir)
    return out


def _write_copy(io: DiskIO, path: Path, data: bytes) -> None:
    """`_write_file`, removing what it left behind if it fails."""
    try:
        _write_file(io, path, data)
    except OSError:
        with contextlib.suppress(OSError):
            io.unlink(path)
        raise


def _keep_torn(io: DiskIO, directory: Path, number: int, buf: bytes, torn: BadRange) -> str:
    """Copy a torn tail to `<dir>/torn/` before it is cut; say where, for the log.

    A full disk only costs the copy (a warning says so): an unfinished write was never
    acknowledged, and the journal must start to free space.
    """
    try:
        return f"a copy is in {_keep(io, directory, TORN, number, buf, [torn])[0].path}"
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return f"no copy kept: {exc}"


def _quarantine_tail(
    io: DiskIO, directory: Path, number: int, buf: bytes, tail: BadRange, loaded: Loaded
) -> bool:
    """Copy a corrupt tail of the last segment to quarantine (into `loaded`); True once
    copied, so it may be cut. On a full disk, False, with an error log: the bytes stay in
    the segment, are skipped, and are quarantined at a later start (appends go after
    them, so they are then a corrupt range like any other), and the journal starts."""
    try:
        loaded.quarantined += _keep(io, directory, QUARANTINE, number, buf, [tail])
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error(
            "journal segment %s: %d bad bytes at offset %d left in place, skipped: no room"
            " to quarantine them (%s); they are quarantined at a start with free space",
            path_of(directory, number),
            tail.length,
            tail.start,
            exc,
        )
        return False
    return True


def _without(buf: bytes, bad: list[BadRange], end: int) -> bytes:
    """`buf[:end]` with the bad ranges cut out."""
    parts: list[bytes] = []
    pos = 0
    for b in bad:
        parts.append(buf[pos : b.start])
        pos = b.end
    parts.append(buf[pos:end])
    return b"".join(parts)


def load(
    io: DiskIO, directory: Path, number: int, *, last: bool, apply: Callable[[Record], None]
) -> Loaded:
    """Read segment `number`, hand every valid record to `apply` in order, and repair
    the file on disk. No damaged byte is dropped without a copy.

    A torn tail of the last segment (an unfinished write) is copied to `<dir>/torn/`,
    then cut off (ftruncate + fsync, a warning). A corrupt tail of the last segment (a
    whole but invalid last record) is copied to the quarantine directory, then cut off
    likewise (an error log; with no room for the copy it is left in place, see
    `_quarantine_tail`). Every other bad range (corrupt ranges anywhere else, a bad tail
    of a non-last segment) is copied to the quarantine directory and the segment is
    rewritten without it (temp file, fsync, rename, directory fsync, an error log). The offsets
    `apply` sees are those of the repaired file: a record's own, less the bad bytes
    before it. Records are applied as they are found, so replay holds one segment's
    bytes and nothing per record.
    """
    path = path_of(directory, number)
    buf = _read_all(io, path)
    bad: list[BadRange] = []
    records = cut = 0
    for item in scan(buf):
        if isinstance(item, Record):
            apply(item._replace(offset=item.offset - cut) if cut else item)
            records += 1
        else:
            bad.append(item)
            cut += item.length
    torn = bad.pop() if bad and bad[-1].torn and last else None
    # a whole but invalid last record of the last segment (and what follows it): cut
    # like a torn tail, no rewrite needed, but quarantined as the damage it is
    tail = bad.pop() if last and torn is None and bad and bad[-1].end == len(buf) else None
    cut_at = torn or tail
    keep_end = cut_at.start if cut_at is not None else len(buf)
    loaded = Loaded(number, keep_end, records)
    copy = _keep_torn(io, directory, number, buf, torn) if torn is not None else ""
    if tail is not None and not _quarantine_tail(io, directory, number, buf, tail, loaded):
        keep_end = loaded.size = len(buf)  # no room for its copy: left where it is
        cut_at = None
    if bad:
        loaded.quarantined[:0] = _keep(io, directory, QUARANTINE, number, buf, bad)
        repaired = _without(buf, bad, keep_end)
        tmp = directory / f"{number:08d}{TMP_SUFFIX}"
        _write_file(io, tmp, repaired)
        io.rename(tmp, path)
        io.fsync_dir(directory)
        loaded.size = len(repaired)
    elif cut_at is not None:
        _truncate(io, path, keep_end)
    for q in loaded.quarantined:
        log.error(
            "journal segment %s: %d bad bytes at offset %d moved to %s; "
            "the records after them were kept",
            path,
            q.length,
            q.offset,
            q.path,
        )
    if torn is not None:
        loaded.torn_bytes = torn.length
        log.warning(
            "journal segment %s: torn tail of %d bytes at offset %d cut off "
            "(an unfinished write, never acknowledged); %s",
            path,
            torn.length,
            torn.start,
            copy,
        )
    return loaded
