"""Feeder logic against an in-memory journal and beanstalkd (real ones: tests/integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

from kqs.beanstalk import BeanstalkUnavailable, PutItem, PutResult, PutStatus
from kqs.clock import ManualClock
from kqs.feeder import Feeder, FeedItem, carries
from kqs.model import Job


@dataclass
class Entry:
    bid: int = 0
    dead: bytes | None = None
    length: int = 0


class FakeJournal:
    def __init__(self) -> None:
        self.jobs: dict[str, Entry] = {}
        self.bodies: dict[str, bytes] = {}

    def add(self, job: Job) -> FeedItem:
        body = job.body()
        self.jobs[job.id] = Entry(length=len(body))
        self.bodies[job.id] = body
        return FeedItem.of(job, body)

    def note_fed_many(self, fed: Sequence[tuple[str, int]]) -> None:
        for job_id, bid in fed:
            if job_id in self.jobs:
                self.jobs[job_id].bid = bid

    async def read_bodies(self, job_ids: Sequence[str]) -> list[bytes]:
        return [self.bodies[j] for j in job_ids]


class FakeBeanstalk:
    """One beanstalkd 'process': jobs by id; `instance` changes on a simulated restart."""

    def __init__(self) -> None:
        self.jobs: dict[int, tuple[PutItem, str]] = {}
        self.next_id = 1
        self.instance = "A"
        self.up = True
        self.answers: list[PutStatus] = []  # statuses to answer the next puts with
        self.kicked: list[int] = []
        self.put_calls = 0
        self.cut_after: int | None = None  # the next put_batch breaks after this many puts

    def restart(self, *, lose_jobs: bool) -> None:
        self.instance += "'"
        if lose_jobs:
            self.jobs.clear()
            self.next_id = 1


class FakeConnection:
    def __init__(self, server: FakeBeanstalk) -> None:
        self.server = server
        self.instance = server.instance
        self.cut = False

    @property
    def broken(self) -> bool:
        return self.cut or not self.server.up or self.server.instance != self.instance

    def _check(self) -> None:
        if self.broken:
            raise BeanstalkUnavailable("connection reset")

    async def put_batch(self, items: Sequence[PutItem]) -> list[PutResult]:
        self._check()
        self.server.put_calls += 1
        out: list[PutResult] = []
        for n, item in enumerate(items):
            if n == self.server.cut_after:
                self.server.cut_after, self.cut = None, True
                raise BeanstalkUnavailable("connection reset mid-batch", out)
            status: PutStatus = self.server.answers.pop(0) if self.server.answers else "INSERTED"
            if status in ("INSERTED", "BURIED"):
                bid = self.server.next_id
                self.server.next_id += 1
                self.server.jobs[bid] = (item, status)
                out.append(PutResult(status, bid))
            else:
                out.append(PutResult(status, None))
        return out

    async def peek_batch(self, ids: Sequence[int]) -> list[bytes | None]:
        self._check()
        return [self.server.jobs[i][0].body if i in self.server.jobs else None for i in ids]

    async def kick_job(self, job_id: int) -> bool:
        self._check()
        self.server.kicked.append(job_id)
        return True

    async def stats(self) -> dict[str, str | int | float]:
        self._check()
        return {"id": self.server.instance, "pid": 1}

    async def delete(self, job_id: int) -> bool:
        self._check()
        return self.server.jobs.pop(job_id, None) is not None

    async def list_tubes(self) -> list[str]:
        self._check()
        return sorted({item.tube for item, _ in self.server.jobs.values()})

    async def stats_tube(self, tube: str) -> dict[str, str | int | float] | None:
        self._check()
        n = sum(1 for item, _ in self.server.jobs.values() if item.tube == tube)
        return {"name": tube, "current-jobs-ready": n} if n else None

    async def close(self) -> None:
        pass


def make(server: FakeBeanstalk, journal: FakeJournal, clock: ManualClock) -> Feeder:
    async def connect() -> FakeConnection:
        if not server.up:
            raise BeanstalkUnavailable("connection refused")
        return FakeConnection(server)

    return Feeder(journal, connect, clock, batch=3, heartbeat=0.01)


def job(n: int, *, delay: int = 0, ts: float = 1_700_000_000.0) -> Job:
    return Job(f"n-{n:04d}", f"tube{n % 2}", {"n": n}, 10000 + n, delay, 60, ts)


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def in_beanstalk(server: FakeBeanstalk) -> set[str]:
    return {item.body.split(b'"')[3].decode() for item, _ in server.jobs.values()}


def test_submitted_jobs_are_put_with_their_fields_and_bids_recorded() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock(1_700_000_000.0)
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i, delay=5)) for i in range(7)])
        await until(lambda: feeder.stats.fed == 7, "all fed")
        assert all(e.bid for e in journal.jobs.values())
        item, _ = server.jobs[journal.jobs["n-0003"].bid]
        assert (item.tube, item.prio, item.delay, item.ttr) == ("tube1", 10003, 5, 60)
        assert server.put_calls == 3  # batches of 3: pipelined, not one call per job
        feeder.stop()
        await task

    run(body)


def test_delay_counts_from_insert_time_when_fed_late() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock(1_700_000_100.0)
        feeder = make(server, journal, clock)
        journal.add(job(1, delay=130, ts=1_700_000_000.0))
        journal.add(job(2, delay=30, ts=1_700_000_000.0))
        feeder.load()
        task = asyncio.create_task(feeder.run())
        await until(lambda: feeder.stats.fed == 2, "fed")
        delays = sorted(item.delay for item, _ in server.jobs.values())
        assert delays == [0, 30]
        feeder.stop()
        await task

    run(body)


def test_jobs_wait_while_beanstalkd_is_down_then_flow() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.up = False
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i)) for i in range(5)])
        await until(lambda: len(clock.slept) >= 3, "backoff retries")
        assert clock.slept[1] > clock.slept[0]  # exponential backoff
        assert feeder.pending == 5 and feeder.stats.fed == 0
        server.up = True
        await until(lambda: feeder.stats.fed == 5, "fed after beanstalkd came back")
        assert in_beanstalk(server) == set(journal.jobs)
        feeder.stop()
        await task

    run(body)


def test_a_batch_cut_midway_puts_again_only_what_was_not_answered() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.cut_after = 2  # of a batch of 3
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i)) for i in range(5)])
        await until(lambda: feeder.stats.fed == 5, "fed after the cut")
        assert len(server.jobs) == 5  # no job was put twice
        assert in_beanstalk(server) == set(journal.jobs)
        assert all(journal.jobs[j].bid for j in journal.jobs)
        feeder.stop()
        await task

    run(body)


@pytest.mark.parametrize("status", ["DRAINING", "OUT_OF_MEMORY"])
def test_refused_puts_are_retried(status: PutStatus) -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.answers = [status] * 4
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i)) for i in range(3)])
        await until(lambda: feeder.stats.fed == 3, "fed after refusals")
        assert feeder.stats.put_retries == 4
        assert in_beanstalk(server) == set(journal.jobs)
        feeder.stop()
        await task

    run(body)


def test_buried_put_is_kept_and_kicked() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.answers = ["BURIED"]
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(1))])
        await until(lambda: feeder.stats.fed == 1, "fed")
        assert server.kicked == [journal.jobs["n-0001"].bid]
        assert feeder.stats.buried_on_put == 1
        feeder.stop()
        await task

    run(body)


def test_too_big_job_is_set_aside_and_others_flow() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.answers = ["INSERTED", "JOB_TOO_BIG", "INSERTED"]
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i)) for i in range(3)])
        await until(lambda: feeder.stats.fed == 2, "small ones fed")
        assert list(feeder.too_big) == ["n-0001"]
        assert feeder.stats.too_big == 1 and feeder.pending == 0
        feeder.stop()
        await task

    run(body)


def test_jobs_lost_by_a_restarted_beanstalkd_are_fed_again() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i)) for i in range(5)])
        await until(lambda: feeder.stats.fed == 5, "fed")
        del journal.jobs["n-0002"]  # finished meanwhile: must not come back
        server.restart(lose_jobs=True)
        server.jobs[1] = (PutItem("x", b'{"id":"someone-else"}', 1, 0, 1), "INSERTED")
        server.next_id = 2
        await until(lambda: feeder.stats.refed == 4, "re-fed")
        await until(lambda: feeder.pending == 0, "queue empty")
        assert in_beanstalk(server) - {"someone-else"} == set(journal.jobs)
        feeder.stop()
        await task

    run(body)


def test_restart_with_binlog_intact_feeds_nothing_again() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(i)) for i in range(4)])
        await until(lambda: feeder.stats.fed == 4, "fed")
        server.restart(lose_jobs=False)
        await until(lambda: feeder.stats.verified == 4, "verification after the restart")
        assert feeder.stats.refed == 0 and feeder.stats.fed == 4
        feeder.stop()
        await task

    run(body)


def test_finished_or_dead_jobs_are_not_fed() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        feeder = make(server, journal, clock)
        items = [journal.add(job(i)) for i in range(3)]
        del journal.jobs["n-0000"]
        journal.jobs["n-0001"].dead = b"{}"
        feeder.submit(items)
        task = asyncio.create_task(feeder.run())
        await until(lambda: feeder.pending == 0 and feeder.stats.fed == 1, "fed")
        assert in_beanstalk(server) == {"n-0002"}
        feeder.stop()
        await task

    run(body)


def test_carries_matches_only_its_own_body() -> None:
    body = job(7).body()
    assert carries(body, "n-0007")
    assert not carries(body, "n-000")
    assert not carries(b'{"id":"n-0008"}', "n-0007")
