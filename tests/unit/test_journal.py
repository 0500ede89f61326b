"""The running journal: group commit, failures, state across reopen, retirement, compaction."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from kqs.errors import DiskFull, JournalFailed, ShuttingDown
from kqs.journal import DiskIO, JobEntry, Journal
from kqs.journal.blocking import RESERVE_BYTES
from kqs.journal.journal import SPACE_CHECK_SECONDS

T = TypeVar("T")


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run one async test body on a fresh loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(make(), 20)

    return asyncio.run(bounded())


async def tick() -> None:
    """Let every ready task run one step (one loop iteration; no timing involved)."""
    loop = asyncio.get_running_loop()
    turn: asyncio.Future[None] = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


def body(n: int) -> bytes:
    return b'{"id":"t-%06d","type":"ping","data":{"n":%d}}' % (n, n)


def jid(n: int) -> str:
    return f"t-{n:06d}"


def seg_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.seg"))


def snapshot(journal: Journal) -> list[tuple[str, JobEntry]]:
    return [
        (k, JobEntry(v.segment, v.offset, v.length, v.bid, v.dead)) for k, v in journal.jobs.items()
    ]


class CountingIO(DiskIO):
    """Counts data fsyncs and writes; can be told to fail them."""

    def __init__(self) -> None:
        self.fsyncs = 0
        self.writes = 0
        self.fail_fsync: int | None = None  # errno to raise
        self.fail_write: int | None = None
        self.half_write = False

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        if self.fail_fsync is not None:
            raise OSError(self.fail_fsync, "injected")
        super().fsync(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.writes += 1
        if self.fail_write is not None:
            if self.half_write and len(data) > 1:
                self.half_write = False
                return super().write(fd, data[: len(data) // 2])
            raise OSError(self.fail_write, "injected")
        return super().write(fd, data)


# -- group commit -------------------------------------------------------------------------


def test_fed_records_ride_on_the_next_durable_write(tmp_path: Path) -> None:
    io = CountingIO()
    journal = Journal.open(tmp_path, io=io)

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])
        after_insert = io.fsyncs
        journal.note_fed(jid(1), 41)
        await asyncio.sleep(0)  # the writer starts, and lingers
        await journal.append_inserts([(jid(2), body(2))])
        assert io.fsyncs == after_insert + 1  # the FED record went with the insert
        journal.note_fed(jid(2), 42)
        await journal.flush()  # flush does not linger
        assert io.fsyncs == after_insert + 2
        await journal.close()

    asyncio.run(go())
    reopened = Journal.open(tmp_path)
    assert [e.bid for e in reopened.jobs.values()] == [41, 42]


def test_concurrent_inserts_share_fsyncs(tmp_path: Path) -> None:
    io = CountingIO()
    journal = Journal.open(tmp_path, io=io)

    async def go() -> None:
        before = io.fsyncs
        await asyncio.gather(*(journal.append_inserts([(jid(i), body(i))]) for i in range(200)))
        assert io.fsyncs - before <= 5
        assert len(journal.jobs) == 200
        stats = journal.stats()
        assert stats.records_written == 200
        assert stats.batches == stats.fsyncs <= 5
        assert stats.max_batch >= 40
        await journal.close()

    run(go)


def test_an_insert_is_in_jobs_only_after_its_fsync(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)

    async def go() -> None:
        task = asyncio.create_task(journal.append_inserts([(jid(1), body(1))]))
        await tick()  # the call is queued, its batch not yet written
        assert jid(1) not in journal.jobs
        await task
        assert journal.jobs[jid(1)].length == len(body(1))
        assert await journal.read_bodies([jid(1)]) == [body(1)]
        await journal.close()

    run(go)


def test_duplicate_ids_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])
        with pytest.raises(ValueError, match="already journaled"):
            await journal.append_inserts([(jid(2), body(2)), (jid(1), body(1))])
        with pytest.raises(ValueError, match="already journaled"):
            await journal.append_inserts([(jid(3), body(3)), (jid(3), body(3))])
        assert list(journal.jobs) == [jid(1)]
        await journal.close()

    run(go)


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "code", "words"),
    [
        ("fsync", errno.EIO, "journal fsync failed: [Errno 5]"),
        ("write", errno.EIO, "journal write failed: [Errno 5]"),
    ],
)
def test_failed_batch_fails_every_waiter_and_all_later_writes(
    tmp_path: Path, what: str, code: int, words: str
) -> None:
    io = CountingIO()
    journal = Journal.open(tmp_path, io=io)

    async def go() -> None:
        await journal.append_inserts([(jid(0), body(0))])
        if what == "fsync":
            io.fail_fsync = code
        else:
            io.fail_write = code
        results = await asyncio.gather(
            *(journal.append_inserts([(jid(i), body(i))]) for i in range(1, 51)),
            return_exceptions=True,
        )
        assert all(isinstance(r, JournalFailed) for r in results)
        for r in results:
            assert isinstance(r, JournalFailed)
            assert words in r.message
            assert "until restarted" in r.message
        assert journal.failed
        assert journal.stats().failed
        assert list(journal.jobs) == [jid(0)]
        io.fail_fsync = io.fail_write = None
        calls = (io.fsyncs, io.writes)
        with pytest.raises(JournalFailed, match=what):
            await journal.append_inserts([(jid(99), body(99))])
        with pytest.raises(JournalFailed):
            await journal.mark_done(jid(0))
        with pytest.raises(JournalFailed):
            await journal.flush()
        journal.note_fed(jid(0), 5)  # nobody waits for FED records: dropped, not raised
        assert (io.fsyncs, io.writes) == calls  # refused at once, nothing retried
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)
    assert jid(0) in reopened.jobs
    asyncio.run(reopened.close())


def test_waiters_queued_behind_a_failing_fsync_fail_too(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    class BlockingIO(CountingIO):
        def fsync(self, fd: int) -> None:
            entered.set()
            release.wait(10)
            raise OSError(errno.EIO, "injected")

    asyncio.run(Journal.open(tmp_path).close())  # the reserve file exists: open does no fsync
    journal = Journal.open(tmp_path, io=BlockingIO())

    async def go() -> None:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(journal.append_inserts([(jid(1), body(1))]))
        await loop.run_in_executor(None, entered.wait, 10)  # batch 1 is inside fsync
        later = [asyncio.create_task(journal.append_inserts([(jid(i), body(i))])) for i in (2, 3)]
        done = asyncio.create_task(journal.flush())
        await tick()  # let the later calls queue
        release.set()
        for task in [first, *later, done]:
            with pytest.raises(JournalFailed, match="fsync failed"):
                await task
        assert journal.jobs == {}
        await journal.close()

    run(go)


def test_a_full_disk_leaves_nothing_half_written(tmp_path: Path) -> None:
    io = CountingIO()
    journal = Journal.open(tmp_path, io=io)
    segment = tmp_path / "00000001.seg"

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])
        size = segment.stat().st_size
        io.fail_write, io.half_write = errno.ENOSPC, True
        with pytest.raises(DiskFull):
            await journal.append_inserts([(jid(2), body(2))])
        assert segment.stat().st_size == size  # the half write was cut back at once
        assert not journal.failed
        assert journal.disk_full
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)
    assert list(reopened.jobs) == [jid(1)]
    assert reopened.report.torn_bytes == 0
    asyncio.run(reopened.close())


class UndoFailsIO(CountingIO):
    """Writes find the disk full after half a batch, and undoing them fails with EIO:
    `undo` names the call that fails (ftruncate for a batch in an existing segment,
    unlink for a segment the batch created)."""

    def __init__(self, undo: str) -> None:
        super().__init__()
        self.undo = undo

    def ftruncate(self, fd: int, length: int) -> None:
        if self.undo == "ftruncate" and self.fail_write is not None:
            raise OSError(errno.EIO, "injected")
        super().ftruncate(fd, length)

    def unlink(self, path: Path) -> None:
        if self.undo == "unlink" and self.fail_write is not None and path.suffix == ".seg":
            raise OSError(errno.EIO, "injected")
        super().unlink(path)


@pytest.mark.parametrize("undo", ["ftruncate", "unlink"])
def test_a_failed_undo_after_a_full_disk_fails_the_journal(tmp_path: Path, undo: str) -> None:
    io = UndoFailsIO(undo)
    rotate = undo == "unlink"  # segment_bytes=1: every batch creates a segment
    journal = Journal.open(tmp_path, io=io, segment_bytes=1 if rotate else 2**20)

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])
        io.fail_write, io.half_write = errno.ENOSPC, True
        results = await asyncio.gather(
            *(journal.append_inserts([(jid(i), body(i))]) for i in range(2, 6)),
            return_exceptions=True,
        )
        for r in results:  # never DiskFull: the file no longer matches the journal's offsets
            assert isinstance(r, JournalFailed), r
            assert "undoing it failed" in r.message
            assert "until restarted" in r.message
        assert journal.failed
        io.fail_write = None
        with pytest.raises(JournalFailed, match="undoing it failed"):
            await journal.append_inserts([(jid(9), body(9))])
        with pytest.raises(JournalFailed):
            await journal.mark_done(jid(1))
        assert list(journal.jobs) == [jid(1)]
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)  # whole records of the half batch may come back
    assert next(iter(reopened.jobs)) == jid(1)  # (a false negative, never a false ack)
    assert set(reopened.jobs) <= {jid(i) for i in range(1, 6)}
    asyncio.run(reopened.close())


class FullDiskIO(CountingIO):
    """A disk that is full until `space` is set: writes fail with ENOSPC, except into the
    room the deleted reserve file gave back."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.room = 0  # bytes freed by deleting the reserve while full
        self.space = False

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.full and not self.space:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
        return super().write(fd, data)

    def unlink(self, path: Path) -> None:
        if self.full and path.name == "reserve":
            self.room += path.stat().st_size
        super().unlink(path)

    def free_bytes(self, path: Path) -> int:
        return 2**30 if self.space or not self.full else self.room


def test_on_a_full_disk_finishes_go_on_and_inserts_resume_when_space_returns(
    tmp_path: Path,
) -> None:
    io = FullDiskIO()
    journal = Journal.open(tmp_path, io=io)
    assert (tmp_path / "reserve").stat().st_size == RESERVE_BYTES

    async def go() -> None:
        await journal.append_inserts([(jid(i), body(i)) for i in range(3)])
        io.full = True
        with pytest.raises(DiskFull):
            await journal.append_inserts([(jid(10), body(10))])
        assert not (tmp_path / "reserve").exists()  # freed for the finishes
        await journal.mark_done(jid(0))  # finishing still works
        await journal.mark_dead(jid(1), b'{"error": "x"}')
        with pytest.raises(DiskFull):  # refused up front, nothing tried
            await journal.append_inserts([(jid(11), body(11))])
        assert journal.stats().disk_full
        io.space = True
        for _ in range(100):  # inserts look for space at most every SPACE_CHECK_SECONDS
            try:
                await journal.append_inserts([(jid(12), body(12))])
                break
            except DiskFull:
                await asyncio.sleep(SPACE_CHECK_SECONDS / 10)
        assert not journal.disk_full
        assert (tmp_path / "reserve").exists()  # made again
        assert list(journal.jobs) == [jid(1), jid(2), jid(12)]
        await journal.close()

    run(go)
    assert list(Journal.open(tmp_path).jobs) == [jid(1), jid(2), jid(12)]


def test_calls_after_close_are_refused(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])
        await journal.close()
        await journal.close()
        with pytest.raises(ShuttingDown):
            await journal.append_inserts([(jid(2), body(2))])
        with pytest.raises(ShuttingDown):
            await journal.read_bodies([jid(1)])

    run(go)


def test_unknown_ids(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)

    async def go() -> None:
        for call in (journal.mark_done, journal.revive, journal.purge):
            with pytest.raises(KeyError):
                await call("nope")
        with pytest.raises(KeyError):
            await journal.mark_dead("nope", b"{}")
        journal.note_fed("nope", 3)
        await journal.flush()
        assert journal.stats().records_written == 0
        await journal.close()

    run(go)


# -- state across reopen ------------------------------------------------------------------


def test_replay_rebuilds_jobs_bids_and_dead_state(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)

    async def go() -> list[tuple[str, JobEntry]]:
        await journal.append_inserts([(jid(i), body(i)) for i in range(6)])
        journal.note_fed_many([(jid(i), 100 + i) for i in range(5)] + [("nope", 1)])
        journal.note_fed(jid(5), 105)
        await journal.mark_done(jid(0))
        await journal.mark_dead(jid(1), b'{"error":"boom"}')
        await journal.mark_dead(jid(2), b'{"error":"again"}')
        await journal.revive(jid(2))
        await journal.mark_dead(jid(3), b"{}")
        await journal.purge(jid(3))
        journal.note_fed(jid(2), 777)
        await journal.flush()
        state = snapshot(journal)
        stats = journal.stats()
        assert (stats.live_jobs, stats.dead_jobs) == (3, 1)
        await journal.close()
        return state

    before = run(go)
    reopened = Journal.open(tmp_path)
    assert snapshot(reopened) == before
    assert [k for k, _ in before] == [jid(1), jid(2), jid(4), jid(5)]
    assert reopened.jobs[jid(1)].dead == b'{"error":"boom"}'
    assert (reopened.jobs[jid(2)].bid, reopened.jobs[jid(2)].dead) == (777, None)
    assert (reopened.jobs[jid(4)].bid, reopened.jobs[jid(5)].bid) == (104, 105)
    assert reopened.report.jobs == 4
    assert reopened.report.quarantined == ()

    async def bodies() -> list[bytes]:
        out = await reopened.read_bodies([jid(5), jid(1)])
        await reopened.close()
        return out

    assert run(bodies) == [body(5), body(1)]


def test_buffered_fed_records_are_written_without_another_append(tmp_path: Path) -> None:
    synced = threading.Event()

    class SignallingIO(DiskIO):
        def fsync(self, fd: int) -> None:
            super().fsync(fd)
            synced.set()

    journal = Journal.open(tmp_path, io=SignallingIO())

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])
        synced.clear()
        journal.note_fed(jid(1), 42)
        # nothing else is called: the FED record reaches the disk on its own
        await asyncio.get_running_loop().run_in_executor(None, synced.wait, 10)
        assert synced.is_set()
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)
    assert reopened.jobs[jid(1)].bid == 42
    asyncio.run(reopened.close())


# -- retirement and compaction ------------------------------------------------------------


class DirectoryIO(DiskIO):
    """Records segment creations, deletions and directory fsyncs, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        if flags & os.O_CREAT and path.suffix == ".seg":
            self.events.append(("create", path.name))
        return fd

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        if path.suffix == ".seg":
            self.events.append(("unlink", path.name))

    def fsync_dir(self, path: Path) -> None:
        super().fsync_dir(path)
        self.events.append(("fsync_dir", str(path)))


def test_creating_or_deleting_a_segment_fsyncs_the_directory(tmp_path: Path) -> None:
    io = DirectoryIO()
    journal = Journal.open(tmp_path, io=io, segment_bytes=1, compact_ratio=0)

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1))])  # segment 1
        await journal.append_inserts([(jid(2), body(2))])  # segment 2
        await journal.mark_done(jid(1))  # segment 3; segment 1 goes
        await journal.flush()
        await journal.close()

    run(go)
    assert seg_files(tmp_path) == ["00000002.seg", "00000003.seg"]
    events = io.events
    changes = [i for i, (what, _) in enumerate(events) if what != "fsync_dir"]
    assert [events[i] for i in changes] == [
        ("create", "00000001.seg"),
        ("create", "00000002.seg"),
        ("create", "00000003.seg"),
        ("unlink", "00000001.seg"),
    ]
    for i in changes:  # each one made durable before anything else happens
        assert events[i + 1] == ("fsync_dir", str(tmp_path)), events[i]


def test_segment_whose_jobs_are_all_done_is_deleted(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, segment_bytes=1, compact_ratio=0)  # a segment per batch

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1)), (jid(2), body(2))])  # segment 1
        await journal.append_inserts([(jid(3), body(3))])  # segment 2
        await journal.mark_done(jid(1))  # segment 3
        await journal.flush()
        assert seg_files(tmp_path) == ["00000001.seg", "00000002.seg", "00000003.seg"]
        await journal.mark_done(jid(2))  # segment 4 (active)
        await journal.flush()
        # 1 has no jobs left; 3 only spoke of jobs homed in 1; 4 is active
        assert seg_files(tmp_path) == ["00000002.seg", "00000004.seg"]
        assert journal.stats().retired_segments == 2
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)
    assert list(reopened.jobs) == [jid(3)]
    asyncio.run(reopened.close())


def test_finish_record_pins_its_segment_while_the_jobs_home_exists(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, segment_bytes=1, compact_ratio=0)

    async def go() -> None:
        await journal.append_inserts([(jid(1), body(1)), (jid(2), body(2))])  # 1: long + short
        await journal.mark_done(jid(2))  # segment 2: DONE about a job homed in 1
        await journal.append_inserts([(jid(3), body(3))])  # segment 3: 2 is sealed
        await journal.flush()
        assert seg_files(tmp_path) == ["00000001.seg", "00000002.seg", "00000003.seg"]

        # Why: without segment 2, replay would bring the finished job back.
        probe = tmp_path.with_name(tmp_path.name + "-probe")
        shutil.copytree(tmp_path, probe)
        (probe / "00000002.seg").unlink()
        resurrected = Journal.open(probe)
        assert jid(2) in resurrected.jobs
        await resurrected.close()

        await journal.mark_done(jid(1))  # segment 4; now 1 goes, and 2 with it
        await journal.flush()
        assert seg_files(tmp_path) == ["00000003.seg", "00000004.seg"]
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)
    assert list(reopened.jobs) == [jid(3)]
    asyncio.run(reopened.close())


def test_compaction_copies_a_lone_live_job_forward(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, segment_bytes=400, compact_ratio=0.5)

    async def go() -> None:
        await journal.append_inserts([(jid(i), body(i)) for i in range(10)])  # segment 1
        assert journal.stats().bytes > 400
        journal.note_fed(jid(0), 42)
        await journal.mark_dead(jid(0), b'{"error":"slow"}')  # rotates to segment 2
        await asyncio.gather(*(journal.mark_done(jid(i)) for i in range(1, 10)))
        await journal.flush()
        assert "00000001.seg" not in seg_files(tmp_path)
        entry = journal.jobs[jid(0)]
        assert entry.segment >= 2
        assert entry.bid == 42
        assert entry.dead == b'{"error":"slow"}'
        assert await journal.read_bodies([jid(0)]) == [body(0)]
        assert journal.stats().copied_forward == 1
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path, segment_bytes=400)
    assert list(reopened.jobs) == [jid(0)]
    entry = reopened.jobs[jid(0)]
    assert (entry.bid, entry.dead) == (42, b'{"error":"slow"}')

    async def check() -> None:
        assert await reopened.read_bodies([jid(0)]) == [body(0)]
        await reopened.close()

    run(check)


def test_compaction_works_in_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kqs.journal.journal.COMPACT_SLICE_JOBS", 2)
    journal = Journal.open(tmp_path, segment_bytes=2000, compact_ratio=0.5)

    async def go() -> None:
        await journal.append_inserts([(jid(i), body(i)) for i in range(40)])  # segment 1
        keep = list(range(0, 40, 8))
        await asyncio.gather(*(journal.mark_done(jid(i)) for i in range(40) if i not in keep))
        await journal.flush()
        stats = journal.stats()
        assert stats.copied_forward == len(keep)
        assert stats.batches >= 1 + 1 + len(keep) // 2
        assert "00000001.seg" not in seg_files(tmp_path)
        assert await journal.read_bodies([jid(i) for i in keep]) == [body(i) for i in keep]
        await journal.close()

    run(go)


def test_copy_forward_keeps_its_segment_while_the_old_home_exists(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, segment_bytes=1, compact_ratio=0.5)  # a segment per batch
    big = {n: body(n) + b" " * 200 for n in range(10)}

    async def go() -> None:
        # 1: A, long-lived, and too big for a copy-forward to pay for the few small
        # segments that it pins below
        await journal.append_inserts([(jid(0), body(0) + b" " * 3000)])
        journal.note_fed(jid(0), 5)  # a record about A in segment 2 pins 2 while 1 exists
        await journal.append_inserts([(jid(n), big[n]) for n in (1, 2, 3, 4)])  # 2: J + K's
        await asyncio.gather(*(journal.mark_done(jid(n)) for n in (2, 3, 4)))  # 3
        await journal.flush()  # segment 2 is mostly garbage: J is copied forward to 4
        assert journal.jobs[jid(1)].segment == 4
        await journal.mark_done(jid(1))  # 5: DONE about J, homed in 4
        await journal.append_inserts([(jid(5), body(5))])  # 6: 5 is sealed
        await journal.flush()
        # 2 still holds J's first INSERT, so the copy (4) and its DONE (5) must stay.
        assert seg_files(tmp_path) == [f"{n:08d}.seg" for n in range(1, 7)]
        probe = tmp_path.with_name(tmp_path.name + "-probe")
        shutil.copytree(tmp_path, probe)
        reopened = Journal.open(probe)
        assert list(reopened.jobs) == [jid(0), jid(5)]
        await reopened.close()

        await journal.mark_done(jid(0))  # 7: now 1 goes, then 2, 3, 4 and 5
        await journal.flush()
        assert seg_files(tmp_path) == ["00000006.seg", "00000007.seg"]
        await journal.close()

    run(go)
    reopened = Journal.open(tmp_path)
    assert list(reopened.jobs) == [jid(5)]
    asyncio.run(reopened.close())


def test_long_lived_jobs_do_not_pin_a_growing_chain_of_segments(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, segment_bytes=2048, compact_ratio=0.5)
    pad = b" " * 200
    long_lived = list(range(20))

    async def go() -> list[tuple[str, JobEntry]]:
        await journal.append_inserts([(jid(i), body(i) + pad) for i in long_lived])  # segment 1
        journal.note_fed_many([(jid(i), 100 + i) for i in long_lived])
        await journal.mark_dead(jid(0), b'{"error":"slow"}')  # segment 2, pinned by 1
        most = 0
        for n in range(100, 400):  # one job at a time in flight: each segment pins the last
            await journal.append_inserts([(jid(n), body(n) + pad)])
            if n > 100:
                await journal.mark_done(jid(n - 1))
            most = max(most, journal.stats().segments)
        await journal.flush()
        stats = journal.stats()
        assert most <= 8, most  # sealed bytes stay within twice the live ones
        assert stats.retired_segments >= 30  # of about 45 segments written
        assert stats.copied_forward >= len(long_lived)
        assert set(journal.jobs) == {jid(i) for i in [*long_lived, 399]}
        assert await journal.read_bodies([jid(i) for i in long_lived]) == [
            body(i) + pad for i in long_lived
        ]
        state = snapshot(journal)
        await journal.close()
        return state

    before = run(go)
    reopened = Journal.open(tmp_path, segment_bytes=2048)
    assert snapshot(reopened) == before
    assert [reopened.jobs[jid(i)].bid for i in long_lived] == [100 + i for i in long_lived]
    assert reopened.jobs[jid(0)].dead == b'{"error":"slow"}'

    async def bodies() -> list[bytes]:
        out = await reopened.read_bodies([jid(i) for i in long_lived])
        await reopened.close()
        return out

    assert run(bodies) == [body(i) + pad for i in long_lived]
