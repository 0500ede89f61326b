"""Journal records: framing, CRC, payloads, and a scanner that finds damage.

A record on disk is a 10-byte header, a kind byte and a payload:

    magic b"\\xa5K" | length u32 LE | crc u32 LE | kind u8 | payload

`length` counts the kind byte and the payload; `crc` is zlib.crc32 of the same bytes.
Every payload starts with the job id (u8 length, then ASCII); what follows depends on
the kind (see `Kind`). docs/journal.md is the full description.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

MAGIC = b"\xa5K"
HEADER = struct.Struct("<2sII")
HEADER_SIZE = HEADER.size
MAX_LENGTH = 2**30
"""Sanity bound on a record's length field (kind + payload): anything larger is damage."""
MAX_ID_BYTES = 255
BID = struct.Struct("<Q")


class Kind(IntEnum):
    """What a record says about its job."""

    INSERT = 1  # id, then the job body (opaque bytes)
    FED = 2  # id, then u64 beanstalkd id
    DONE = 3  # id only
    DEAD = 4  # id, then info bytes (opaque JSON)
    REVIVE = 5  # id only
    PURGE = 6  # id only
    FED_MANY = 7  # id "*", then per job: u8 id length, id, u64 beanstalkd id


MANY_ID = "*"
"""The id field of a record about many jobs (never a job id: see kqs.model.NODE_RE)."""

_KIND_OF: dict[int, Kind] = {int(k): k for k in Kind}
_ID_ONLY = frozenset({Kind.DONE, Kind.REVIVE, Kind.PURGE})


class Record(NamedTuple):
    """One valid record found in a buffer: where it starts, its size, and what it says.

    (A NamedTuple: replay makes one per record, and these are cheap to make.)"""

    offset: int
    size: int
    kind: Kind
    job_id: str
    data: bytes  # the payload after the id: body, packed bid, info, or b""

    @property
    def data_offset(self) -> int:
        """Offset in the buffer of `data` (for INSERT: where the job body starts)."""
        return self.offset + data_start(self.job_id)


@dataclass(frozen=True, slots=True)
class BadRange:
    """Bytes [start, end) that hold no valid record.

    `torn` is True for an unfinished write: no valid record follows (the damage runs to
    the end of the buffer) and the damage does not begin with a whole record (see
    `framed_at`). Otherwise the range is corrupt: a valid record starts at `end`, or
    `end` is the end of the buffer and the range begins with a whole record that
    fails its checks (written in full, then damaged).
    """

    start: int
    end: int
    torn: bool

    @property
    def length(self) -> int:
        return self.end - self.start


def _id_bytes(job_id: str) -> bytes:
    """The job id as its on-disk bytes; ValueError unless 1-255 ASCII characters."""
    try:
        raw = job_id.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"job id {job_id!r} must be ASCII") from None
    if not 1 <= len(raw) <= MAX_ID_BYTES:
        raise ValueError(f"job id {job_id!r} must be 1-{MAX_ID_BYTES} bytes long")
    return raw


def data_start(job_id: str) -> int:
    """Offset of a record's data (after header, kind, id length and id) from its start."""
    return HEADER_SIZE + 2 + len(job_id)


def record_size(job_id: str, data_length: int) -> int:
    """Total bytes of a record about `job_id` carrying `data_length` bytes of data."""
    return data_start(job_id) + data_length


def encode(kind: Kind, job_id: str, data: bytes = b"") -> bytes:
    """Frame one record; ValueError if the id is not 1-255 ASCII bytes or it is too big."""
    raw_id = _id_bytes(job_id)
    body = bytes((kind, len(raw_id))) + raw_id + data
    if len(body) > MAX_LENGTH:
        raise ValueError(f"record for job {job_id} is {len(body)} bytes; at most {MAX_LENGTH}")
    return HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def encode_insert(job_id: str, body: bytes) -> bytes:
    """INSERT: a new job (or a copy-forward of an existing one) with its body."""
    return encode(Kind.INSERT, job_id, body)


def encode_fed(job_id: str, bid: int) -> bytes:
    """FED: the job is carried by beanstalkd job `bid` (0 <= bid < 2**64)."""
    return encode(Kind.FED, job_id, pack_bid(bid))


def encode_done(job_id: str) -> bytes:
    """DONE: the job finished; it is retired."""
    return encode(Kind.DONE, job_id)


def encode_dead(job_id: str, info: bytes) -> bytes:
    """DEAD: the job was declared dead; `info` says why (opaque JSON)."""
    return encode(Kind.DEAD, job_id, info)


def encode_revive(job_id: str) -> bytes:
    """REVIVE: a dead job is live again and must be fed anew."""
    return encode(Kind.REVIVE, job_id)


def encode_purge(job_id: str) -> bytes:
    """PURGE: the job is removed without running."""
    return encode(Kind.PURGE, job_id)


def pack_bid(bid: int) -> bytes:
    """A beanstalkd id as FED data; ValueError when outside u64."""
    if not 0 <= bid < 2**64:
        raise ValueError(f"beanstalkd id {bid} is not a u64")
    return BID.pack(bid)


def unpack_bid(data: bytes) -> int:
    """The beanstalkd id carried by FED data."""
    bid: int = BID.unpack(data)[0]
    return bid


def encode_fed_many(fed: Sequence[tuple[str, int]]) -> bytes:
    """FED_MANY: FED for every (job id, bid) of `fed` in one record (at least one)."""
    if not fed:
        raise ValueError("a FED_MANY record needs at least one job")
    return encode(Kind.FED_MANY, MANY_ID, pack_fed_many(fed))


def pack_fed_many(fed: Sequence[tuple[str, int]]) -> bytes:
    """The data of a FED_MANY record."""
    parts = []
    for job_id, bid in fed:
        raw = _id_bytes(job_id)
        parts.append(bytes((len(raw),)) + raw + pack_bid(bid))
    return b"".join(parts)


def unpack_fed_many(data: bytes) -> Iterator[tuple[str, int]]:
    """The (job id, bid) pairs of FED_MANY data (checked by `decode_at`)."""
    pos = 0
    while pos < len(data):
        end = pos + 1 + data[pos]
        yield data[pos + 1 : end].decode("ascii"), _unpack_bid_at(data, end)[0]
        pos = end + BID.size


def _fed_many_ok(data: bytes) -> bool:
    """True if FED_MANY data is one or more whole entries with ASCII ids."""
    pos = 0
    while pos < len(data):
        n = data[pos]
        if n == 0 or not data[pos + 1 : pos + 1 + n].isascii():
            return False
        pos += 1 + n + BID.size
    return 0 < pos == len(data)


_unpack_bid_at = BID.unpack_from


def decode_at(buf: bytes, offset: int, view: memoryview | None = None) -> Record | None:
    """The record starting exactly at `offset` if it is complete and valid, else None.

    Valid means: magic, sane length, all bytes present, CRC match, a known kind, and a
    payload of the shape that kind requires. `view` (a memoryview of `buf`) saves
    making one per call when scanning. (Replay runs this once per record: it is
    written for speed, e.g. the Record is made without NamedTuple's Python __new__.)
    """
    end_of_header = offset + HEADER_SIZE
    if end_of_header > len(buf):
        return None
    magic, length, crc = _unpack_header(buf, offset)
    if magic != MAGIC or not 2 <= length <= MAX_LENGTH:
        return None
    end = end_of_header + length
    if end > len(buf):
        return None
    if view is None:
        view = memoryview(buf)
    if _crc32(view[end_of_header:end]) != crc:
        return None
    kind = _KIND_OF.get(buf[end_of_header])
    id_end = end_of_header + 2 + buf[end_of_header + 1]
    if kind is None or id_end == end_of_header + 2 or id_end > end:
        return None
    try:
        job_id = buf[end_of_header + 2 : id_end].decode("ascii")
    except UnicodeDecodeError:
        return None
    data = buf[id_end:end]
    if (kind is Kind.FED and len(data) != BID.size) or (kind in _ID_ONLY and data):
        return None
    if kind is Kind.FED_MANY and (job_id != MANY_ID or not _fed_many_ok(data)):
        return None
    return _new_record(Record, (offset, HEADER_SIZE + length, kind, job_id, data))


_unpack_header = HEADER.unpack_from
_crc32 = zlib.crc32
_new_record = tuple.__new__


def framed_at(buf: bytes, offset: int) -> bool:
    """True if a whole record's frame starts at `offset`: the magic, a sane length, and
    every byte that length promises present in `buf` (valid or not). A write cut short
    leaves no such frame behind it: its last record lacks bytes."""
    if offset + HEADER_SIZE > len(buf):
        return False
    magic, length, _ = _unpack_header(buf, offset)
    end: int = offset + HEADER_SIZE + length
    return magic == MAGIC and 2 <= length <= MAX_LENGTH and end <= len(buf)


def find_next(buf: bytes, start: int) -> int | None:
    """The first offset >= `start` where a complete valid record begins, or None."""
    view = memoryview(buf)
    pos = buf.find(MAGIC, start)
    while pos != -1:
        if decode_at(buf, pos, view) is not None:
            return pos
        pos = buf.find(MAGIC, pos + 1)
    return None


def scan(buf: bytes) -> Iterator[Record | BadRange]:
    """Yield every record of `buf` in order, and a BadRange for every damaged stretch.

    At a bad record, search forward for the next valid record: if one is found, the
    bytes before it are a corrupt range (`torn=False`) and scanning goes on there;
    if none is, the bytes to the end are the last item: a torn tail (`torn=True`),
    unless they begin with a whole but invalid record, which makes them corrupt.
    """
    pos = 0
    view = memoryview(buf)
    while pos < len(buf):
        rec = decode_at(buf, pos, view)
        if rec is not None:
            yield rec
            pos += rec.size
            continue
        nxt = find_next(buf, pos + 1)
        if nxt is None:
            yield BadRange(pos, len(buf), torn=not framed_at(buf, pos))
            return
        yield BadRange(pos, nxt, torn=False)
        pos = nxt
