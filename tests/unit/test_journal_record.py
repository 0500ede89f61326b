"""Record framing and the damage-finding scanner, on bytes only."""

from __future__ import annotations

import struct
import zlib

import pytest

from kqs.journal.record import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    BadRange,
    Kind,
    Record,
    data_start,
    decode_at,
    encode,
    encode_dead,
    encode_done,
    encode_fed,
    encode_fed_many,
    encode_insert,
    encode_purge,
    encode_revive,
    record_size,
    scan,
    unpack_bid,
    unpack_fed_many,
)

BODY = b'{"id":"n1-0001","type":"ping","data":{"a":1}}'


def test_header_is_magic_length_crc() -> None:
    raw = encode_insert("n1-0001", BODY)
    magic, length, crc = HEADER.unpack_from(raw)
    assert magic == MAGIC == b"\xa5K"
    assert length == len(raw) - HEADER_SIZE
    assert crc == zlib.crc32(raw[HEADER_SIZE:])
    assert raw[HEADER_SIZE] == Kind.INSERT
    assert raw[HEADER_SIZE + 1] == len("n1-0001")
    assert raw[HEADER_SIZE + 2 : HEADER_SIZE + 9] == b"n1-0001"
    assert raw[data_start("n1-0001") :] == BODY
    assert len(raw) == record_size("n1-0001", len(BODY))


@pytest.mark.parametrize(
    ("raw", "kind", "data"),
    [
        (encode_insert("a", BODY), Kind.INSERT, BODY),
        (encode_insert("a", b""), Kind.INSERT, b""),
        (encode_fed("a", 2**64 - 1), Kind.FED, struct.pack("<Q", 2**64 - 1)),
        (encode_done("a"), Kind.DONE, b""),
        (encode_dead("a", b'{"error":"boom"}'), Kind.DEAD, b'{"error":"boom"}'),
        (encode_revive("a"), Kind.REVIVE, b""),
        (encode_purge("a"), Kind.PURGE, b""),
    ],
)
def test_every_kind_round_trips(raw: bytes, kind: Kind, data: bytes) -> None:
    rec = decode_at(raw, 0)
    assert rec == Record(0, len(raw), kind, "a", data)
    assert raw[rec.data_offset :] == data


def test_fed_carries_the_beanstalkd_id() -> None:
    rec = decode_at(encode_fed("x-1", 123456789), 0)
    assert rec is not None
    assert unpack_bid(rec.data) == 123456789


def test_fed_many_carries_every_pair_in_order() -> None:
    fed = [("n1-1", 7), ("x" * 255, 2**64 - 1), ("n1-2", 0)]
    raw = encode_fed_many(fed)
    rec = decode_at(raw, 0)
    assert rec is not None
    assert (rec.kind, rec.job_id, rec.size) == (Kind.FED_MANY, "*", len(raw))
    assert list(unpack_fed_many(rec.data)) == fed
    with pytest.raises(ValueError, match="at least one"):
        encode_fed_many([])


@pytest.mark.parametrize("job_id", ["", "é", "x" * 256])
def test_bad_ids_are_refused(job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        encode_done(job_id)


def test_bid_outside_u64_is_refused() -> None:
    with pytest.raises(ValueError, match="u64"):
        encode_fed("a", 2**64)


def _reframe(kind: int, payload: bytes) -> bytes:
    body = bytes([kind]) + payload
    return HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


@pytest.mark.parametrize(
    "raw",
    [
        _reframe(9, b"\x01a"),  # unknown kind
        _reframe(Kind.DONE, b"\x00"),  # empty id
        _reframe(Kind.DONE, b"\x05ab"),  # id longer than the payload
        _reframe(Kind.DONE, b"\x01a!"),  # DONE with data
        _reframe(Kind.FED, b"\x01a\x01\x02"),  # FED with a short bid
        _reframe(Kind.FED_MANY, b"\x01*"),  # FED_MANY without entries
        _reframe(Kind.FED_MANY, b"\x01a" + b"\x01b" + bytes(8)),  # not the id "*"
        _reframe(Kind.FED_MANY, b"\x01*" + b"\x01b" + bytes(7)),  # a short bid
        _reframe(Kind.FED_MANY, b"\x01*" + b"\x00" + bytes(8)),  # an empty id
        _reframe(Kind.FED_MANY, b"\x01*" + b"\x01\xff" + bytes(8)),  # a non-ASCII id
        _reframe(Kind.FED_MANY, b"\x01*" + b"\x01b" + bytes(9)),  # a stray byte
        _reframe(Kind.INSERT, b"\x01\xff"),  # non-ASCII id
        HEADER.pack(MAGIC, 2**30 + 1, 0) + b"\x01\x01a",  # insane length
        HEADER.pack(b"XX", 3, zlib.crc32(b"\x03\x01a")) + b"\x03\x01a",  # bad magic
        encode_done("a")[:-1],  # truncated
    ],
)
def test_invalid_records_do_not_decode(raw: bytes) -> None:
    assert decode_at(raw, 0) is None


def test_scan_yields_records_with_offsets() -> None:
    raws = [encode_insert("a", BODY), encode_fed("a", 7), encode_done("a")]
    buf = b"".join(raws)
    items = list(scan(buf))
    assert [type(i) for i in items] == [Record, Record, Record]
    recs = [i for i in items if isinstance(i, Record)]
    assert [r.offset for r in recs] == [0, len(raws[0]), len(raws[0]) + len(raws[1])]
    assert [r.kind for r in recs] == [Kind.INSERT, Kind.FED, Kind.DONE]


def test_torn_tail_at_every_byte_of_the_last_record() -> None:
    head = encode_insert("a", BODY) + encode_fed("a", 7)
    last = encode_insert("b", BODY)
    for cut in range(1, len(last)):
        items = list(scan(head + last[:cut]))
        assert items[-1] == BadRange(len(head), len(head) + cut, torn=True), cut
        assert [i.kind for i in items[:-1] if isinstance(i, Record)] == [Kind.INSERT, Kind.FED]


@pytest.mark.parametrize("where", [6, HEADER_SIZE, HEADER_SIZE + 3, -1])
def test_a_whole_but_invalid_last_record_is_corrupt_not_torn(where: int) -> None:
    head = encode_insert("a", BODY) + encode_fed("a", 7)
    last = bytearray(encode_insert("b", BODY))
    last[where] ^= 0x40  # CRC field or bytes it covers: the frame stays whole
    assert list(scan(head + bytes(last)))[-1] == BadRange(len(head), len(head) + len(last), False)
    tail = list(scan(head + bytes(last) + b"\x00"))[-1]  # and garbage after it
    assert tail == BadRange(len(head), len(head) + len(last) + 1, torn=False)


@pytest.mark.parametrize("where", [0, 3, 7, HEADER_SIZE, HEADER_SIZE + 3, -1])
def test_corrupt_middle_record_is_a_range_up_to_the_next_valid_one(where: int) -> None:
    first, middle, last = encode_insert("a", BODY), encode_insert("b", BODY), encode_done("a")
    damaged = bytearray(middle)
    damaged[where] ^= 0x40
    buf = first + bytes(damaged) + last
    items = list(scan(buf))
    bad = BadRange(len(first), len(first) + len(middle), torn=False)
    assert items == [
        Record(0, len(first), Kind.INSERT, "a", BODY),
        bad,
        Record(bad.end, len(last), Kind.DONE, "a", b""),
    ]


def test_garbage_between_records_is_skipped() -> None:
    first, last = encode_done("a"), encode_done("b")
    buf = first + b"\x00" * 13 + MAGIC + b"junk" + last
    items = list(scan(buf))
    assert items[1] == BadRange(len(first), len(buf) - len(last), torn=False)
    assert isinstance(items[2], Record)
    assert items[2].job_id == "b"


def test_all_garbage_is_one_torn_tail() -> None:
    assert list(scan(b"\x00" * 50)) == [BadRange(0, 50, torn=True)]


def test_encode_refuses_a_record_over_the_sanity_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kqs.journal.record.MAX_LENGTH", 10)
    with pytest.raises(ValueError, match="at most 10"):
        encode(Kind.INSERT, "a", b"x" * 10)
