"""Replay of damaged segment files: torn tails are cut, corrupt ranges quarantined."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from kqs.journal import Journal, Quarantined
from kqs.journal.diskio import DiskIO
from kqs.journal.record import Record, scan

SEG1 = "00000001.seg"


def body(n: int) -> bytes:
    return b'{"id":"r-%04d","type":"ping","data":{"n":%d}}' % (n, n)


def jid(n: int) -> str:
    return f"r-{n:04d}"


def write_jobs(directory: Path, batches: list[list[int]], *, segment_bytes: int = 2**20) -> None:
    """Journal each batch of job numbers with its own fsync, then close."""
    journal = Journal.open(directory, segment_bytes=segment_bytes, compact_ratio=0)

    async def go() -> None:
        for batch in batches:
            await journal.append_inserts([(jid(n), body(n)) for n in batch])
        await journal.close()

    asyncio.run(go())


def record_offsets(data: bytes) -> list[int]:
    return [r.offset for r in scan(data) if isinstance(r, Record)]


def reopen_and_check(directory: Path, expected: list[int]) -> Journal:
    journal = Journal.open(directory)
    assert list(journal.jobs) == [jid(n) for n in expected]

    async def bodies() -> list[bytes]:
        return await journal.read_bodies(list(journal.jobs))

    assert asyncio.run(bodies()) == [body(n) for n in expected]
    return journal


def close(journal: Journal) -> None:
    asyncio.run(journal.close())


def test_empty_directory_is_created_with_one_segment(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "a" / "journal")
    assert journal.report.segments == 0
    assert journal.jobs == {}
    assert sorted(p.name for p in (tmp_path / "a" / "journal").iterdir()) == [SEG1, "reserve"]
    close(journal)


def test_torn_tail_at_every_byte_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = tmp_path / "original"
    write_jobs(original, [[1], [2], [3]])
    data = (original / SEG1).read_bytes()
    last = record_offsets(data)[-1]
    caplog.set_level(logging.WARNING, logger="kqs.journal")
    for cut in range(last, len(data)):
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        (case / SEG1).write_bytes(data[:cut])
        caplog.clear()
        journal = reopen_and_check(case, [1, 2])
        assert journal.report.torn_bytes == cut - last
        assert (case / SEG1).stat().st_size == last
        assert journal.report.quarantined == ()
        assert not (case / "quarantine").exists()  # a torn tail is not damage
        if cut > last:
            copy = case / "torn" / f"00000001-{last}.bin"
            assert copy.read_bytes() == data[last:cut]  # cut, but never without a copy
            assert f"torn tail of {cut - last} bytes at offset {last}" in caplog.text
            assert str(case / SEG1) in caplog.text
            assert f"a copy is in {copy}" in caplog.text

        async def append_more(journal: Journal = journal) -> None:
            await journal.append_inserts([(jid(4), body(4))])
            await journal.close()

        asyncio.run(append_more())
        close(reopen_and_check(case, [1, 2, 4]))


def test_corrupt_middle_record_is_quarantined_and_later_records_survive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_jobs(tmp_path, [[1], [2], [3]])
    path = tmp_path / SEG1
    data = bytearray(path.read_bytes())
    offsets = record_offsets(bytes(data))
    start, end = offsets[1], offsets[2]
    data[start + 20] ^= 0x01  # one flipped bit inside record 2's body
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.ERROR, logger="kqs.journal"):
        journal = reopen_and_check(tmp_path, [1, 3])
    qfile = tmp_path / "quarantine" / f"00000001-{start}.bin"
    assert journal.report.quarantined == (Quarantined(qfile, 1, start, end - start),)
    assert qfile.read_bytes() == bytes(data[start:end])
    assert path.read_bytes() == bytes(data[:start] + data[end:])
    assert any(
        r.levelno == logging.ERROR
        and str(path) in r.getMessage()
        and f"offset {start}" in r.getMessage()
        for r in caplog.records
    )
    close(journal)
    again = reopen_and_check(tmp_path, [1, 3])
    assert again.report.quarantined == ()
    assert again.report.torn_bytes == 0
    close(again)


def test_corrupt_last_record_of_the_last_segment_is_quarantined_not_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_jobs(tmp_path, [[1], [2], [3]])
    path = tmp_path / SEG1
    data = bytearray(path.read_bytes())
    last = record_offsets(bytes(data))[-1]
    data[last + 20] ^= 0x01  # one flipped bit inside the last record's body: acknowledged
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="kqs.journal"):
        journal = reopen_and_check(tmp_path, [1, 2])
    qfile = tmp_path / "quarantine" / f"00000001-{last}.bin"
    assert journal.report.quarantined == (Quarantined(qfile, 1, last, len(data) - last),)
    assert qfile.read_bytes() == bytes(data[last:])
    assert journal.report.torn_bytes == 0
    assert path.read_bytes() == bytes(data[:last])
    assert "torn tail" not in caplog.text
    assert any(
        r.levelno == logging.ERROR
        and str(path) in r.getMessage()
        and f"offset {last}" in r.getMessage()
        for r in caplog.records
    )

    async def more() -> None:
        await journal.append_inserts([(jid(4), body(4))])
        await journal.close()

    asyncio.run(more())
    close(reopen_and_check(tmp_path, [1, 2, 4]))


class NoRoomForQuarantine(DiskIO):
    """A disk where writing a quarantine copy fails with ENOSPC (the space it needs is
    just not there; the journal's own reserve was made earlier)."""

    def __init__(self) -> None:
        self.fds: set[int] = set()

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        if path.parent.name == "quarantine":
            self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.discard(fd)  # the number may be reused by a segment
        super().close(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd in self.fds:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(fd, data)


def test_a_corrupt_last_record_with_no_room_to_quarantine_it_is_left_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal still starts (a full disk must not keep it from serving finishes):
    the bytes are skipped, and quarantined at the first start with room for them."""
    write_jobs(tmp_path, [[1], [2], [3]])
    path = tmp_path / SEG1
    data = bytearray(path.read_bytes())
    last = record_offsets(bytes(data))[-1]
    data[last + 20] ^= 0x01
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.ERROR, logger="kqs.journal"):
        journal = Journal.open(tmp_path, io=NoRoomForQuarantine())
    assert list(journal.jobs) == [jid(1), jid(2)]
    assert journal.report.quarantined == ()
    assert "left in place" in caplog.text
    assert path.read_bytes() == bytes(data)  # nothing cut without its copy

    async def more() -> None:
        await journal.append_inserts([(jid(4), body(4))])
        await journal.close()

    asyncio.run(more())
    later = reopen_and_check(tmp_path, [1, 2, 4])  # room again: quarantined now
    (q,) = later.report.quarantined
    assert (q.offset, q.path.read_bytes()) == (last, bytes(data[last:]))
    close(later)


def test_a_second_torn_tail_at_the_same_offset_keeps_the_first_copy(tmp_path: Path) -> None:
    write_jobs(tmp_path, [[1], [2]])
    path = tmp_path / SEG1
    data = path.read_bytes()
    last = record_offsets(data)[-1]
    copies = tmp_path / "torn"
    for n, cut in enumerate([last + 3, last + 9, last + 9], start=1):
        path.write_bytes(data[:cut])
        close(reopen_and_check(tmp_path, [1]))
        assert len(list(copies.iterdir())) == min(n, 2)  # the same bytes again: no new copy
    assert (copies / f"00000001-{last}.bin").read_bytes() == data[last : last + 3]
    assert (copies / f"00000001-{last}-2.bin").read_bytes() == data[last : last + 9]


def test_bad_tail_of_an_earlier_segment_is_quarantined_not_cut(tmp_path: Path) -> None:
    write_jobs(tmp_path, [[1], [2], [3]], segment_bytes=1)  # one segment per batch
    first = tmp_path / SEG1
    data = first.read_bytes()
    first.write_bytes(data + data[:7])  # garbage after the last record of segment 1
    journal = reopen_and_check(tmp_path, [1, 2, 3])
    qfile = tmp_path / "quarantine" / f"00000001-{len(data)}.bin"
    assert journal.report.quarantined == (Quarantined(qfile, 1, len(data), 7),)
    assert journal.report.torn_bytes == 0
    assert first.read_bytes() == data
    close(journal)


def test_corrupt_range_and_torn_tail_in_the_last_segment(tmp_path: Path) -> None:
    write_jobs(tmp_path, [[1], [2], [3], [4]])
    path = tmp_path / SEG1
    data = bytearray(path.read_bytes())
    offsets = record_offsets(bytes(data))
    data[offsets[1]] ^= 0xFF  # bad magic on record 2
    del data[offsets[3] + 5 :]  # record 4 torn
    path.write_bytes(bytes(data))
    journal = reopen_and_check(tmp_path, [1, 3])
    assert [q.offset for q in journal.report.quarantined] == [offsets[1]]
    assert journal.report.torn_bytes == 5
    assert path.stat().st_size == offsets[3] - (offsets[2] - offsets[1])

    async def more() -> None:
        await journal.append_inserts([(jid(5), body(5))])
        await journal.close()

    asyncio.run(more())
    close(reopen_and_check(tmp_path, [1, 3, 5]))


def test_leftover_rewrite_temp_file_is_removed(tmp_path: Path) -> None:
    write_jobs(tmp_path, [[1]])
    (tmp_path / "00000001.seg.tmp").write_bytes(b"half a rewrite")
    journal = reopen_and_check(tmp_path, [1])
    assert not (tmp_path / "00000001.seg.tmp").exists()
    close(journal)
