"""Feeder logic against an in-memory journal and beanstalkd (real ones: tests/integration)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

from kqs.beanstalk import BeanstalkUnavailable, PutItem, PutResult, PutStatus
from kqs.clock import ManualClock
from kqs.feeder import Feeder, FeedItem
from kqs.model import Job
from kqs.stale import RETRY_FOR, StaleCopy, carries
from kqs.store import MemoryStore


@dataclass
class Entry:
    bid: int = 0
    dead: bytes | None = None
    length: int = 0


class FakeJournal:
    def __init__(self) -> None:
        self.jobs: dict[str, Entry] = {}
        self.bodies: dict[str, bytes] = {}
        self.failing_reads = 0  # the next reads raise an unexpected error
        self.garbled_reads = 0  # the next reads return bytes that are not a job body

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
        if self.failing_reads:
            self.failing_reads -= 1
            raise RuntimeError("a bug in the journal")
        if self.garbled_reads:
            self.garbled_reads -= 1
            return [b"not a job body" for _ in job_ids]
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
        self.kick: list[str] = []  # how the next kicks go: "not_found" or "broken"
        self.max_job_size: int | None = None  # reported by stats when set
        self.reserved_elsewhere: set[int] = set()  # jobs another connection holds
        self.deletes: list[int] = []  # every delete asked for

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
        how = self.server.kick.pop(0) if self.server.kick else "kicked"
        if how == "broken":
            self.cut = True
            raise BeanstalkUnavailable("connection reset during kick")
        found = self.server.jobs.get(job_id)
        if how == "not_found" or found is None or found[1] != "BURIED":
            return False
        self.server.kicked.append(job_id)
        self.server.jobs[job_id] = (found[0], "INSERTED")
        return True

    async def stats(self) -> dict[str, str | int | float]:
        self._check()
        stats: dict[str, str | int | float] = {"id": self.server.instance, "pid": 1}
        if self.server.max_job_size is not None:
            stats["max-job-size"] = self.server.max_job_size
        return stats

    async def delete(self, job_id: int) -> bool:
        self._check()
        self.server.deletes.append(job_id)
        if job_id in self.server.reserved_elsewhere:
            return False  # beanstalkd's answer for a job reserved by another connection
        return self.server.jobs.pop(job_id, None) is not None

    async def stats_job(self, job_id: int) -> dict[str, str | int | float] | None:
        self._check()
        found = self.server.jobs.get(job_id)
        if found is None:
            return None
        state = "reserved" if job_id in self.server.reserved_elsewhere else "ready"
        return {"id": job_id, "state": state}

    async def list_tubes(self) -> list[str]:
        self._check()
        return sorted({item.tube for item, _ in self.server.jobs.values()})

    async def stats_tube(self, tube: str) -> dict[str, str | int | float] | None:
        self._check()
        n = sum(1 for item, _ in self.server.jobs.values() if item.tube == tube)
        return {"name": tube, "current-jobs-ready": n} if n else None

    async def close(self) -> None:
        pass


def make(
    server: FakeBeanstalk,
    journal: FakeJournal,
    clock: ManualClock,
    *,
    store: MemoryStore | None = None,
    max_body: int = 65535,
) -> Feeder:
    async def connect() -> FakeConnection:
        if not server.up:
            raise BeanstalkUnavailable("connection refused")
        return FakeConnection(server)

    return Feeder(
        journal, connect, clock, batch=3, heartbeat=0.01, store=store, node="n", max_body=max_body
    )


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


def test_a_delayed_job_buried_on_put_is_put_again_with_its_delay_not_kicked() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.answers = ["BURIED"]
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(1, delay=600, ts=clock.time()))])

        def settled() -> bool:
            states = [status for _, status in server.jobs.values()]
            return states == ["INSERTED"] and feeder.pending == 0

        await until(settled, "one copy, put again")
        assert server.kicked == []  # a kick would have made it ready 600 s early
        ((item, _),) = server.jobs.values()
        assert item.delay > 500
        feeder.stop()
        await task

    run(body)


@pytest.mark.parametrize("kick", ["not_found", "broken"])
def test_a_buried_put_whose_kick_fails_ends_up_ready(kick: str) -> None:
    """BURIED on put, then the kick fails (NOT_FOUND, or the connection breaks): the
    buried copy is deleted and the job fed again, so exactly one ready copy is left and
    the journal names it."""

    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        server.answers, server.kick = ["BURIED"], [kick]
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(job(1))])

        def settled() -> bool:
            states = [status for _, status in server.jobs.values()]
            return states == ["INSERTED"] and feeder.pending == 0

        await until(settled, "one ready copy")
        (bid,) = server.jobs
        assert journal.jobs["n-0001"].bid == bid
        assert feeder.stats.buried_on_put == 1
        feeder.stop()
        await task

    run(body)


def test_an_unexpected_error_is_logged_and_feeding_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        journal.failing_reads = 2
        feeder = make(server, journal, clock)
        for i in range(4):
            journal.add(job(i))
        feeder.load()  # ids only: bodies are read from the journal
        task = asyncio.create_task(feeder.run())
        await until(lambda: feeder.stats.fed == 4 or task.done(), "fed despite the errors")
        assert not task.done()
        assert in_beanstalk(server) == set(journal.jobs)
        assert "a bug in the journal" in feeder.stats.last_error
        assert len(clock.slept) >= 2  # backed off before trying again
        feeder.stop()
        await task

    with caplog.at_level(logging.ERROR, logger="kqs.feeder"):
        run(body)
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert len(logged) == 2
    assert "a bug in the journal" in str(logged[0].exc_info[1] if logged[0].exc_info else "")


def test_a_batch_whose_bodies_cannot_be_read_back_is_fed_later_not_dropped() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        journal.garbled_reads = 1
        feeder = make(server, journal, clock)
        for i in range(3):
            journal.add(job(i))
        feeder.load()
        task = asyncio.create_task(feeder.run())
        await until(lambda: feeder.stats.fed == 3 or task.done(), "fed after the bad read")
        assert in_beanstalk(server) == set(journal.jobs)
        feeder.stop()
        await task

    run(body)


def big_job(n: int, size: int) -> Job:
    return Job(f"n-{n:04d}", "big", "x" * size, 10000, 0, 60, 1_700_000_000.0)


def test_a_payload_is_deleted_at_finish_after_beanstalkds_limit_grew() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        store = MemoryStore(clock=clock)
        server.max_job_size = 150
        feeder = make(server, journal, clock, store=store)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(big_job(1, 200))])
        await until(lambda: feeder.stats.fed == 1, "reference fed")
        assert store.keys() == ["n-0001"]
        server.max_job_size = 100_000  # beanstalkd restarted with a larger -z
        server.restart(lose_jobs=False)
        await until(lambda: feeder.max_body == 100_000, "new limit seen")
        feeder.forget("n-0001", journal.jobs["n-0001"].length)
        await until(lambda: not store.keys(), "payload deleted")
        feeder.stop()
        await task

    run(body)


def test_a_payload_is_deleted_at_finish_for_a_job_offloaded_after_job_too_big() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        store = MemoryStore(clock=clock)
        server.answers = ["JOB_TOO_BIG"]  # within the known limit, refused all the same
        feeder = make(server, journal, clock, store=store)
        task = asyncio.create_task(feeder.run())
        feeder.submit([journal.add(big_job(1, 200))])
        await until(lambda: feeder.stats.fed == 1, "reference fed")
        assert store.keys() == ["n-0001"]
        feeder.forget("n-0001", journal.jobs["n-0001"].length)
        await until(lambda: not store.keys(), "payload deleted")
        feeder.stop()
        await task

    run(body)


async def fed_and_purged(
    server: FakeBeanstalk, journal: FakeJournal, feeder: Feeder, n: int
) -> int:
    """Feed job `n`, then drop it from the journal (purged); its bid is a stale copy."""
    feeder.submit([journal.add(job(n))])
    await until(lambda: journal.jobs[f"n-{n:04d}"].bid != 0, "fed")
    bid = journal.jobs.pop(f"n-{n:04d}").bid
    return bid


def test_a_stale_copy_another_connection_holds_is_deleted_once_let_go() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        bid = await fed_and_purged(server, journal, feeder, 1)
        server.reserved_elsewhere.add(bid)
        feeder.discard([StaleCopy(bid, "n-0001")])
        await until(lambda: server.deletes == [bid], "delete tried")
        clock.advance(5)
        await until(lambda: server.deletes == [bid, bid], "tried again")
        assert bid in server.jobs and feeder.stale_copies == 1
        server.reserved_elsewhere.clear()  # the runner buried it
        clock.advance(1)
        await until(lambda: bid not in server.jobs, "stale copy deleted")
        feeder.stop()
        await task

    run(body)


def test_a_stale_copy_held_for_too_long_is_given_up() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        bid = await fed_and_purged(server, journal, feeder, 1)
        server.reserved_elsewhere.add(bid)
        feeder.discard([StaleCopy(bid, "n-0001")])
        await until(lambda: server.deletes == [bid], "held")
        clock.advance(RETRY_FOR + 1)
        await until(lambda: feeder.stale_copies == 0, "given up")
        server.reserved_elsewhere.clear()
        clock.advance(10)
        await asyncio.sleep(0.05)
        assert bid in server.jobs and server.deletes == [bid, bid]  # no longer tried
        feeder.stop()
        await task

    run(body)


def test_a_stale_id_naming_another_job_after_a_restart_is_not_deleted() -> None:
    """beanstalkd restarted without its binlog hands out ids from 1 again: a held (or
    asked) stale id may now carry a live job, which must not be deleted."""

    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        feeder = make(server, journal, clock)
        task = asyncio.create_task(feeder.run())
        bid = await fed_and_purged(server, journal, feeder, 1)
        server.reserved_elsewhere.add(bid)
        feeder.discard([StaleCopy(bid, "n-0001")])
        await until(lambda: server.deletes == [bid], "held")
        server.reserved_elsewhere.clear()
        server.restart(lose_jobs=True)
        feeder.submit([journal.add(job(2))])
        await until(lambda: journal.jobs["n-0002"].bid == bid, "another job under that id")
        feeder.discard([StaleCopy(bid, "n-0001")])
        clock.advance(2)
        await until(lambda: feeder.stale_copies == 0, "checked")
        assert in_beanstalk(server) == {"n-0002"}
        feeder.stop()
        await task

    run(body)
