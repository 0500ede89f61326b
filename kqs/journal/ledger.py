"""The journal's in-memory state: which jobs are unfinished, where their bodies are,
and which segment files may be deleted. No I/O: `Ledger.apply` is the one state
transition, used alike by replay and by a running journal after each fsync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kqs.journal.record import BID, HEADER_SIZE, Kind, Record, unpack_bid, unpack_fed_many


@dataclass(slots=True)
class JobEntry:
    """A job not yet done or purged: where its body is, and what is known about it."""

    segment: int  # home segment: the one holding its latest INSERT record
    offset: int  # offset of the body bytes in that segment file
    length: int  # body length
    bid: int  # beanstalkd id carrying it; 0 = not known to be in beanstalkd
    dead: bytes | None  # DEAD info, None while live


@dataclass(slots=True)
class SegmentState:
    """What the ledger knows of one existing segment file."""

    number: int
    size: int
    homes: dict[str, None] = field(default_factory=dict)  # jobs whose home it is
    live: int = 0  # bytes a copy-forward of its home jobs would write
    refs: set[int] = field(default_factory=set)  # other existing segments it pins


def copy_cost(job_id: str, entry: JobEntry) -> int:
    """Bytes a copy-forward of the job writes: INSERT, plus FED and DEAD if they apply.

    (`record_size` spelled out: this runs several times per job on the insert path.)"""
    head = HEADER_SIZE + 2 + len(job_id)
    cost = head + entry.length
    if entry.bid:
        cost += head + BID.size
    if entry.dead is not None:
        cost += head + len(entry.dead)
    return cost


class Ledger:
    """Jobs and segments as the records say, with no I/O.

    Invariants: every job is in `homes` of exactly its home segment; `live` of a
    segment is the copy cost of its home jobs; `refs` of a segment holds the other
    existing segments that were a job's home when one of its records was written.
    A segment may be deleted once it has no home jobs and no refs (`retirable`).
    """

    def __init__(self) -> None:
        self.jobs: dict[str, JobEntry] = {}
        self.segments: dict[int, SegmentState] = {}
        self.dead = 0
        self.dirty = True  # something may have become retirable or compactable

    def add_segment(self, number: int, size: int = 0) -> None:
        self.segments[number] = SegmentState(number, size)
        self.dirty = True

    def apply(self, kind: Kind, job_id: str, data: bytes, number: int, offset: int) -> None:
        """Apply one record found at `offset` of segment `number` (records in log order).

        INSERT adds the job, or for a known id moves its home here (copy-forward: the
        job goes to the end of `jobs`); FED sets bid, FED_MANY does so for each of its
        jobs; DONE and PURGE remove it; DEAD marks it dead; REVIVE makes it live with
        bid 0. Unknown ids are ignored.
        """
        seg = self.segments[number]
        entry = self.jobs.get(job_id)
        if kind is Kind.INSERT:
            head = HEADER_SIZE + 2 + len(job_id)
            if entry is None:  # a new job, most records of all: `_insert` spelled out
                self.jobs[job_id] = JobEntry(number, offset + head, len(data), 0, None)
                seg.homes[job_id] = None
                seg.live += head + len(data)
                return
            self._insert(seg, job_id, entry, offset + head, len(data))
            return
        if kind is Kind.FED_MANY:
            for fed_id, bid in unpack_fed_many(data):
                self._fed(seg, fed_id, bid)
            return
        if kind is Kind.FED:
            self._fed(seg, job_id, unpack_bid(data))
            return
        if entry is None:
            return
        home = self.segments[entry.segment]
        if home is not seg:
            seg.refs.add(home.number)
        before = copy_cost(job_id, entry)
        if kind is Kind.DONE or kind is Kind.PURGE:
            del self.jobs[job_id]
            del home.homes[job_id]
            home.live -= before
            if entry.dead is not None:
                self.dead -= 1
            self.dirty = True
            return
        if kind is Kind.DEAD:
            if entry.dead is None:
                self.dead += 1
            entry.dead = data
        elif kind is Kind.REVIVE:
            if entry.dead is not None:
                self.dead -= 1
            entry.dead = None
            entry.bid = 0
        self._recost(home, job_id, entry, before)

    def _fed(self, seg: SegmentState, job_id: str, bid: int) -> None:
        """FED about `job_id`, found in `seg` (`_recost` spelled out: one job in two
        has a FED entry, so this runs once per job at replay)."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return
        home = self.segments[entry.segment]
        if home is not seg:
            seg.refs.add(home.number)
        if bool(bid) != bool(entry.bid):
            fed_cost = HEADER_SIZE + 2 + len(job_id) + BID.size
            home.live += fed_cost if bid else -fed_cost
            self.dirty = self.dirty or not bid
        entry.bid = bid

    def replayer(self, number: int) -> Callable[[Record], None]:
        """`apply` for the records of segment `number`, one at a time, as replay finds them."""
        apply = self.apply

        def replay(rec: Record) -> None:
            apply(rec.kind, rec.job_id, rec.data, number, rec.offset)

        return replay

    def _insert(
        self, seg: SegmentState, job_id: str, entry: JobEntry | None, offset: int, length: int
    ) -> None:
        """A new job at `seg`, or the copy-forward of `entry` to `seg`."""
        if entry is None:
            entry = JobEntry(seg.number, offset, length, 0, None)
        else:
            old = self.segments[entry.segment]
            old.live -= copy_cost(job_id, entry)
            del old.homes[job_id]
            if old is not seg:
                seg.refs.add(old.number)
            del self.jobs[job_id]
            entry.segment, entry.offset, entry.length = seg.number, offset, length
            self.dirty = True
        self.jobs[job_id] = entry
        seg.homes[job_id] = None
        seg.live += copy_cost(job_id, entry)

    def _recost(self, home: SegmentState, job_id: str, entry: JobEntry, before: int) -> None:
        """Account a change of the job's copy cost in its home segment."""
        after = copy_cost(job_id, entry)
        home.live += after - before
        if after < before:
            self.dirty = True

    def set_bid(self, job_id: str, bid: int) -> bool:
        """Set a known job's bid ahead of its FED record; False for an unknown id."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return False
        before = copy_cost(job_id, entry)
        entry.bid = bid
        self._recost(self.segments[entry.segment], job_id, entry, before)
        return True

    def retirable(self, active: int) -> list[int]:
        """Forget and return (ascending) every segment that may now be deleted.

        A segment other than `active` goes when no job has its home there and none
        of its records is about a job homed in another existing segment; forgetting
        one may free others, so this runs to a fixed point.
        """
        gone: list[int] = []
        found = True
        while found:
            found = False
            for number, seg in list(self.segments.items()):
                if number != active and not seg.homes and not seg.refs:
                    del self.segments[number]
                    for other in self.segments.values():
                        other.refs.discard(number)
                    gone.append(number)
                    found = True
        return sorted(gone)

    def compaction_source(self, active: int, ratio: float) -> int | None:
        """The sealed segment to compact next, or None.

        First choice: the oldest sealed segment with home jobs whose copy cost is below
        `ratio` of its size. Otherwise the oldest sealed segment with home jobs, if
        copying forward the home jobs of the k oldest such segments (some k >= 1) costs
        below `ratio` of the bytes that lets go: those k segments, and every sealed
        segment without home jobs before the (k+1)th. Such a segment exists only for
        its refs, which point to older segments, so it goes once they are all gone.
        That is what frees a chain of segments, each pinned by a record about a job
        homed in the one before, down to an old segment of long-lived jobs. With no
        such k, sealed bytes are at most their copy cost / `ratio`.
        """
        sealed = [self.segments[n] for n in sorted(self.segments) if n != active]
        for seg in sealed:
            if seg.homes and seg.live < ratio * seg.size:
                return seg.number
        oldest: int | None = None
        cost = freed = 0
        for seg in sealed:
            if seg.homes:
                if oldest is not None and cost < ratio * freed:
                    return oldest
                if oldest is None:
                    oldest = seg.number
                cost += seg.live
            if oldest is not None:
                freed += seg.size
        return oldest if cost < ratio * freed else None
