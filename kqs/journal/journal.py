"""The journal: the set of segments, replay, group commit, retirement and compaction.

In-memory state (`Ledger`) is changed only on the event-loop thread, and only by
`Ledger.apply`, the one state transition that replay also uses: what a running journal
holds is exactly what replaying its files would build. All file I/O of a running
journal happens in one worker thread; start-up replay is synchronous. docs/journal.md
describes the format and the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from kqs.errors import DiskFull, JournalFailed, ShuttingDown
from kqs.journal import segment
from kqs.journal.blocking import (
    RESERVE_BYTES,
    RESERVE_NAME,
    UNTIL_RESTART,
    NoSpace,
    close_io,
    commit_io,
    delete_io,
    make_reserve,
    read_io,
    space_back,
)
from kqs.journal.diskio import OS_IO, DiskIO
from kqs.journal.ledger import JobEntry, Ledger
from kqs.journal.record import MANY_ID, Kind, encode, pack_bid, pack_fed_many
from kqs.journal.segment import Quarantined

log = logging.getLogger("kqs.journal")
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

MAX_BATCH_BYTES = 16 * 2**20
"""A batch stops taking queued appends once it holds this many bytes (at least one)."""
ADVISORY_LINGER = 0.2
"""Seconds advisory records (FED) wait for a durable write to share its fsync with."""
SPACE_CHECK_SECONDS = 1.0
"""While the disk is full, how often an insert may look whether space came back."""
COMPACT_SLICE_BYTES = 2**20
COMPACT_SLICE_JOBS = 1024


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What `Journal.open` found."""

    segments: int
    records: int
    jobs: int
    torn_bytes: int
    quarantined: tuple[Quarantined, ...]


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counters of a running journal (records and batches since open)."""

    segments: int
    bytes: int
    live_jobs: int
    dead_jobs: int
    fsyncs: int  # batch fsyncs
    records_written: int
    batches: int
    max_batch: int  # records in the largest batch
    last_batch: int  # records in the latest batch
    failed: bool
    retired_segments: int
    copied_forward: int
    disk_full: bool = False


@dataclass(slots=True)  # not frozen: a frozen dataclass is made 3x slower, once per record
class _Rec:
    """A record waiting to be written, with what `Ledger.apply` needs of it."""

    kind: Kind
    job_id: str
    data: bytes
    raw: bytes

    @staticmethod
    def of(kind: Kind, job_id: str, data: bytes = b"") -> _Rec:
        return _Rec(kind, job_id, data, encode(kind, job_id, data))


@dataclass(slots=True)
class _Op:
    """Records queued together, and who waits for their fsync (None: nobody)."""

    records: list[_Rec]
    waiter: asyncio.Future[None] | None
    size: int = 0


@dataclass(frozen=True, slots=True)
class _Copy:
    """A job body read for copy-forward from `segment` at `offset`."""

    job_id: str
    segment: int
    offset: int
    body: bytes


class Journal:
    """Durable record of every unfinished job, in append-only segment files.

    Durable calls (`append_inserts`, `mark_done`, `mark_dead`, `revive`, `purge`)
    return only after the fsync covering their records; calls made while a write is
    in flight share the next write and fsync (group commit). The in-memory state
    (`jobs`) changes only after that fsync. If a write or fsync fails, every waiter
    of that batch gets JournalFailed, `failed` becomes True, and every later write is
    refused at once: fsyncs are never retried. Use from one event loop; `open` is
    synchronous and meant to run before serving.
    """

    def __init__(
        self,
        directory: Path,
        *,
        io: DiskIO,
        segment_bytes: int,
        compact_ratio: float,
        ledger: Ledger,
        fds: dict[int, int],
        active: int,
        report: ReplayReport,
    ) -> None:
        """Wrap replayed state; use `Journal.open`."""
        self.directory = directory
        self.report = report
        self.failed = False
        self.jobs: dict[str, JobEntry] = ledger.jobs
        self._io = io
        self._segment_bytes = segment_bytes
        self._compact_ratio = compact_ratio
        self._ledger = ledger
        self._fds = fds
        self._active = active
        self._failure = ""
        self._closing = False
        self._closed = False
        self._closer: asyncio.Future[None] | None = None
        self.disk_full = False
        self._space_checked = float("-inf")
        self._queue: deque[_Op] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._durable_queued = 0  # queued ops that someone waits for
        self._hurry: asyncio.Event | None = None  # set when a durable op or flush arrives
        self._urgent = False  # flush or close asked for everything since the last linger
        self._compact_source: int | None = None
        self._compact_off = compact_ratio <= 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kqs-journal")
        self._fsyncs = self._records = self._batches = self._max_batch = self._last_batch = 0
        self._retired = self._copied = 0

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_bytes: int = 64 * 2**20,
        compact_ratio: float = 0.5,
        io: DiskIO = OS_IO,
    ) -> Journal:
        """Open (creating if needed) the journal in `directory` and replay it.

        Synchronous: reads every segment in order, cuts a torn tail off the last one,
        quarantines other damage (see segment.load), rebuilds `jobs`, deletes segments
        that are retirable, and leaves the last segment open for appends. `report`
        says what was found. OSError if the directory cannot be read or repaired.
        """
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be positive, not {segment_bytes}")
        if not 0 <= compact_ratio < 1:
            raise ValueError(f"compact_ratio must be in [0, 1), not {compact_ratio}")
        directory = Path(directory)
        io.makedirs(directory)
        io.fsync_dir(directory.parent)
        numbers = segment.list_numbers(io, directory)
        ledger = Ledger()
        fds: dict[int, int] = {}
        records = torn = 0
        quarantined: list[Quarantined] = []
        collecting = gc.isenabled()
        gc.disable()  # replay makes a few long-lived, acyclic objects per job: the cyclic
        try:  # collector would walk them over and over (a quarter of replay time)
            for i, number in enumerate(numbers):
                ledger.add_segment(number)
                loaded = segment.load(
                    io,
                    directory,
                    number,
                    last=i == len(numbers) - 1,
                    apply=ledger.replayer(number),
                )
                ledger.segments[number].size = loaded.size
                records += loaded.records
                torn += loaded.torn_bytes
                quarantined.extend(loaded.quarantined)
            if numbers:
                active = numbers[-1]
            else:
                active = 1
                fds[active] = segment.create(io, directory, active)
                ledger.add_segment(active)
            for number in ledger.retirable(active):
                segment.delete(io, directory, number, None)
            for number in ledger.segments:
                if number not in fds:
                    fds[number] = segment.open_existing(
                        io, directory, number, writable=number == active
                    )
        except BaseException:
            close_io(io, list(fds.values()))
            raise
        finally:
            if collecting:
                gc.enable()
        report = ReplayReport(len(numbers), records, len(ledger.jobs), torn, tuple(quarantined))
        if not make_reserve(io, directory):
            log.warning("journal %s: no room for the %d-byte reserve", directory, RESERVE_BYTES)
        log.info(
            "journal %s: %d segments, %d records, %d unfinished jobs (%d dead)",
            directory,
            report.segments,
            report.records,
            report.jobs,
            ledger.dead,
        )
        return cls(
            directory,
            io=io,
            segment_bytes=segment_bytes,
            compact_ratio=compact_ratio,
            ledger=ledger,
            fds=fds,
            active=active,
            report=report,
        )

    # -- the API ---------------------------------------------------------------------

    async def append_inserts(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Journal new jobs as (job_id, body) pairs; return after the fsync covering them.

        Only then are they in `jobs`. ValueError (nothing written) if an id is already
        a job, repeats in `items`, or is not 1-255 ASCII bytes. JournalFailed if the
        write or fsync failed or the journal had failed before; ShuttingDown once
        closing.
        """
        self._check_writable()
        recs: list[_Rec] = []
        if self.disk_full:
            await self._check_space()
        seen: set[str] = set()
        for job_id, body in items:
            if job_id in self.jobs or job_id in seen:
                raise ValueError(f"job id {job_id} is already journaled")
            seen.add(job_id)
            recs.append(_Rec.of(Kind.INSERT, job_id, body))
        if recs:
            await self._submit(recs)

    def note_fed(self, job_id: str, bid: int) -> None:
        """Remember that beanstalkd job `bid` carries the job (in memory now).

        Its FED record goes out with the next batch; nobody waits for it, and a lost
        one only causes a re-feed. A writer is started if none runs, so the record is
        written even if no other append comes. Unknown ids are ignored; so is the
        record (not the bid) once the journal has failed or is closing.
        """
        if self._ledger.set_bid(job_id, bid):
            self._advise(_Rec.of(Kind.FED, job_id, pack_bid(bid)))

    def note_fed_many(self, fed: Sequence[tuple[str, int]]) -> None:
        """`note_fed` for many jobs at once, in one FED_MANY record."""
        known = [(job_id, bid) for job_id, bid in fed if self._ledger.set_bid(job_id, bid)]
        if known:
            self._advise(_Rec.of(Kind.FED_MANY, MANY_ID, pack_fed_many(known)))

    def _advise(self, rec: _Rec) -> None:
        """Queue an advisory record (nobody waits for it) unless nothing may be written."""
        if not (self.failed or self._closing):
            self._queue.append(_Op([rec], None, len(rec.raw)))
            self._ensure_writer()

    async def mark_done(self, job_id: str) -> None:
        """Durably record that the job finished, then drop it from `jobs`. KeyError if
        unknown."""
        await self._about(Kind.DONE, job_id)

    async def mark_dead(self, job_id: str, info: bytes) -> None:
        """Durably declare the job dead with `info`; it stays in `jobs` with dead=info.
        KeyError if unknown."""
        await self._about(Kind.DEAD, job_id, info)

    async def revive(self, job_id: str) -> None:
        """Durably make the job live again with bid 0 (to be fed anew). KeyError if
        unknown."""
        await self._about(Kind.REVIVE, job_id)

    async def purge(self, job_id: str) -> None:
        """Durably remove the job (meant for dead ones) from `jobs`. KeyError if unknown."""
        await self._about(Kind.PURGE, job_id)

    async def read_bodies(self, job_ids: Sequence[str]) -> list[bytes]:
        """The bodies of the given jobs, in order, read in the worker thread.

        KeyError for an id not in `jobs`; OSError if a read fails; ShuttingDown once
        closed.
        """
        if self._closed:
            raise ShuttingDown("the journal is closed")
        spans: list[tuple[int, int, int]] = []
        for job_id in job_ids:
            entry = self.jobs[job_id]
            spans.append((self._fds[entry.segment], entry.offset, entry.length))
        if not spans:
            return []
        return await self._run(read_io, self._io, spans)

    async def flush(self) -> None:
        """Write whatever is queued (buffered FED records too) and wait until the writer
        is idle, including the retirement and compaction that followed. JournalFailed
        if the journal has failed."""
        self._wake_writer()
        self._ensure_writer()
        while self._writer is not None:
            await asyncio.shield(self._writer)
        if self.failed:
            raise JournalFailed(self._failure)

    def stats(self) -> JournalStats:
        """Counters and sizes at this moment."""
        segments = self._ledger.segments
        return JournalStats(
            segments=len(segments),
            bytes=sum(s.size for s in segments.values()),
            live_jobs=len(self.jobs) - self._ledger.dead,
            dead_jobs=self._ledger.dead,
            fsyncs=self._fsyncs,
            records_written=self._records,
            batches=self._batches,
            max_batch=self._max_batch,
            last_batch=self._last_batch,
            failed=self.failed,
            disk_full=self.disk_full,
            retired_segments=self._retired,
            copied_forward=self._copied,
        )

    async def close(self) -> None:
        """Write and fsync what is queued, close the files and stop the worker thread.

        Later durable calls raise ShuttingDown. Safe to call more than once.
        """
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closer)

    # -- helpers of the API ------------------------------------------------------------

    def _check_writable(self) -> None:
        """Refuse a durable call at once if the journal failed or is closing."""
        if self.failed:
            raise JournalFailed(self._failure)
        if self._closing:
            raise ShuttingDown("the journal is closed")

    async def _about(self, kind: Kind, job_id: str, data: bytes = b"") -> None:
        """Durably write one record about a known job."""
        self._check_writable()
        if job_id not in self.jobs:
            raise KeyError(job_id)
        await self._submit([_Rec.of(kind, job_id, data)])

    async def _submit(self, recs: list[_Rec]) -> None:
        """Queue records for the next batch and wait for its fsync."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(recs, waiter, sum(len(r.raw) for r in recs)))
        self._durable_queued += 1
        self._wake_writer(urgent=False)
        self._ensure_writer()
        await waiter

    async def _run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Run blocking `fn(*args)` in the journal's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _close(self) -> None:
        """Body of `close`: drain the writer, then close files and the executor."""
        self._closing = True
        self._wake_writer()
        self._ensure_writer()
        while self._writer is not None:
            await asyncio.shield(self._writer)
        self._closed = True
        fds = list(self._fds.values())
        self._fds.clear()
        await self._run(close_io, self._io, fds)
        self._executor.shutdown(wait=True)

    # -- the writer --------------------------------------------------------------------

    def _ensure_writer(self) -> None:
        """Start the writer task if queued work exists and none runs (needs a running
        loop; without one the work waits for the next call that has one)."""
        if self._writer is not None or not self._queue or self.failed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._writer = loop.create_task(self._write_loop(), name="kqs-journal-writer")

    async def _write_loop(self) -> None:
        """Commit batches until nothing is queued and no compaction slice is due.

        Advisory records alone (FED: nobody waits for them) do not get an fsync of their
        own: they wait up to ADVISORY_LINGER for a durable write to go out with, which
        keeps fsyncs for the inserts and finishes that need them."""
        try:
            while not self.failed:
                copies = await self._compaction_slice()
                if not self._queue and not copies:
                    break
                if not copies and not self._durable_queued:
                    await self._linger()
                await self._commit(copies)
                if not self.failed:
                    await self._after_commit()
        except asyncio.CancelledError:
            self._fail(f"journal writer cancelled; {UNTIL_RESTART}", [])
            raise
        except Exception as exc:
            log.exception("journal writer crashed")
            self._fail(f"journal writer crashed: {exc!r}; {UNTIL_RESTART}", [])
        finally:
            self._writer = None

    async def _out_of_space(self, reason: str, ops: list[_Op]) -> None:
        """A batch found the disk full and was undone: refuse its waiters with DiskFull,
        and free the reserve so that finishes (small records) can still be written."""
        if not self.disk_full:
            log.error(
                "journal %s: disk full (%s): inserts are refused until space is freed;"
                " finishing jobs goes on in the reserve",
                self.directory,
                reason,
            )
        self.disk_full = True
        self._space_checked = asyncio.get_running_loop().time()
        with contextlib.suppress(OSError):
            await self._run(self._io.unlink, self.directory / RESERVE_NAME)
        error = DiskFull(
            "the server's disk is full: nothing of this request was written;"
            " retry later or send to another server"
        )
        for op in ops:
            if op.waiter is not None and not op.waiter.done():
                op.waiter.set_exception(error)

    async def _check_space(self) -> None:
        """While the disk is full: at most every SPACE_CHECK_SECONDS, see whether space
        came back (the reserve can be made again); DiskFull if not."""
        now = asyncio.get_running_loop().time()
        if now - self._space_checked >= SPACE_CHECK_SECONDS:
            self._space_checked = now
            if await self._run(space_back, self._io, self.directory):
                self.disk_full = False
                log.warning("journal %s: disk space is back; inserts resume", self.directory)
                return
        raise DiskFull(
            "the server's disk is full: inserts are refused until space is freed;"
            " retry later or send to another server"
        )

    def _wake_writer(self, *, urgent: bool = True) -> None:
        """End a linger: a durable op arrived, or (`urgent`) flush/close want it all now."""
        self._urgent = self._urgent or urgent
        if self._hurry is not None:
            self._hurry.set()

    async def _linger(self) -> None:
        """Wait for a durable op (or flush/close) for at most ADVISORY_LINGER seconds."""
        self._hurry = hurry = asyncio.Event()
        if self._urgent or self._durable_queued or self._closing:
            self._urgent = False
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), ADVISORY_LINGER)

    def _take_batch(self) -> list[_Op]:
        """Pop queued ops up to MAX_BATCH_BYTES (at least one op if any is queued)."""
        ops: list[_Op] = []
        size = 0
        while self._queue and (not ops or size + self._queue[0].size <= MAX_BATCH_BYTES):
            op = self._queue.popleft()
            ops.append(op)
            size += op.size
            if op.waiter is not None:
                self._durable_queued -= 1
        return ops

    def _render_copies(self, copies: list[_Copy]) -> list[_Rec]:
        """Copy-forward records for the jobs still homed where their body was read:
        INSERT, then FED if the job has a bid, then DEAD if it is dead."""
        recs: list[_Rec] = []
        for c in copies:
            entry = self.jobs.get(c.job_id)
            if entry is None or entry.segment != c.segment or entry.offset != c.offset:
                continue
            recs.append(_Rec.of(Kind.INSERT, c.job_id, c.body))
            if entry.bid:
                recs.append(_Rec.of(Kind.FED, c.job_id, pack_bid(entry.bid)))
            if entry.dead is not None:
                recs.append(_Rec.of(Kind.DEAD, c.job_id, entry.dead))
            self._copied += 1
        return recs

    async def _commit(self, copies: list[_Copy]) -> None:
        """Write one batch (copies first, then queued ops), fsync once, then apply its
        records in order and resolve its waiters; on failure fail them all."""
        recs = self._render_copies(copies)
        ops = self._take_batch()
        for op in ops:
            recs.extend(op.records)
        if recs:
            active = self._ledger.segments[self._active]
            rotate = active.size >= self._segment_bytes
            number = self._active + 1 if rotate else self._active
            offset = 0 if rotate else active.size
            fd = None if rotate else self._fds[number]
            buf = b"".join(r.raw for r in recs)
            try:
                fd = await self._run(commit_io, self._io, self.directory, fd, number, offset, buf)
            except JournalFailed as exc:
                self._fail(exc.message, ops)
                return
            except NoSpace as exc:
                await self._out_of_space(str(exc), ops)
                return
            if rotate:
                self._fds[number] = fd
                self._ledger.add_segment(number)
                self._active = number
            for r in recs:
                self._ledger.apply(r.kind, r.job_id, r.data, number, offset)
                offset += len(r.raw)
            self._ledger.segments[number].size = offset
            self._fsyncs += 1
            self._batches += 1
            self._records += len(recs)
            self._last_batch = len(recs)
            self._max_batch = max(self._max_batch, len(recs))
        for op in ops:
            if op.waiter is not None and not op.waiter.done():
                op.waiter.set_result(None)

    async def _after_commit(self) -> None:
        """Delete segments the last batch made retirable (oldest first, each durably),
        then choose the segment to compact next, if any."""
        ledger = self._ledger
        if not ledger.dirty:
            return
        ledger.dirty = False
        gone = ledger.retirable(self._active)
        if gone:
            doomed = [(number, self._fds.pop(number, None)) for number in gone]
            try:
                await self._run(delete_io, self._io, self.directory, doomed)
            except JournalFailed as exc:
                self._fail(exc.message, [])
                return
            self._retired += len(gone)
        if not self._compact_off:
            self._compact_source = ledger.compaction_source(self._active, self._compact_ratio)

    async def _compaction_slice(self) -> list[_Copy]:
        """Read the next bounded slice of bodies to copy forward out of the segment being
        compacted; empty when none is due (or the journal is closing)."""
        source = self._compact_source
        if source is None or self._closing or self._compact_off:
            return []
        seg = self._ledger.segments.get(source)
        if seg is None or not seg.homes:
            self._compact_source = None
            return []
        picked: list[tuple[str, int, int]] = []
        total = 0
        for job_id in seg.homes:
            entry = self.jobs[job_id]
            picked.append((job_id, entry.offset, entry.length))
            total += entry.length
            if total >= COMPACT_SLICE_BYTES or len(picked) >= COMPACT_SLICE_JOBS:
                break
        fd = self._fds[source]
        try:
            bodies = await self._run(read_io, self._io, [(fd, o, n) for _, o, n in picked])
        except OSError as exc:
            log.error("journal compaction stopped until restart: segment %d: %s", source, exc)
            self._compact_off = True
            self._compact_source = None
            return []
        return [
            _Copy(job_id, source, offset, body)
            for (job_id, offset, _), body in zip(picked, bodies, strict=True)
        ]

    def _fail(self, message: str, ops: list[_Op]) -> None:
        """Mark the journal failed for good and fail `ops` and everything queued."""
        if not self.failed:
            self.failed = True
            self._failure = message
            log.error("%s", message)
        for op in [*ops, *self._queue]:
            if op.waiter is not None and not op.waiter.done():
                op.waiter.set_exception(JournalFailed(message))
        self._queue.clear()
