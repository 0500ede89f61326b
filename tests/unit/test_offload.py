"""Large bodies through the bulk store (in-memory twin; the real stores: tests/integration)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from kqs import app
from kqs.clock import ManualClock
from kqs.feeder import FeedConnection, Feeder
from kqs.journal import Journal
from kqs.model import IdGenerator, Job
from kqs.offload import Offloader
from kqs.service import Service
from kqs.store import MemoryStore, StoreUnavailable
from tests.unit.test_feeder import FakeBeanstalk, FakeConnection, FakeJournal, run, until


def big(n: int, size: int = 200) -> Job:
    return Job(f"n-{n:04d}", "big", "x" * size, 10000, 0, 60, 1_700_000_000.0)


def make(
    server: FakeBeanstalk, journal: FakeJournal, clock: ManualClock, store: MemoryStore
) -> Feeder:
    async def connect() -> FakeConnection:
        return FakeConnection(server)

    return Feeder(
        journal, connect, clock, batch=10, heartbeat=0.01, store=store, node="n", max_body=150
    )


def test_large_bodies_go_to_the_store_and_a_reference_is_fed() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        store = MemoryStore(clock=clock)
        feeder = make(server, journal, clock, store)
        task = asyncio.create_task(feeder.run())
        small = Job("n-0100", "small", 1, 10000, 0, 60, 1_700_000_000.0)
        feeder.submit([journal.add(big(1)), journal.add(small)])
        await until(lambda: feeder.stats.fed == 2, "both fed")
        assert await store.get("n-0001") == journal.bodies["n-0001"]
        refs = {orjson.loads(item.body)["id"]: item for item, _ in server.jobs.values()}
        ref = orjson.loads(refs["n-0001"].body)
        assert ref == {
            "id": "n-0001",
            "type": "big",
            "bulk": len(journal.bodies["n-0001"]),
            "ttr": 60,
        }
        assert refs["n-0001"].tube == "big"
        assert refs["n-0100"].body == journal.bodies["n-0100"]  # small: the body itself
        feeder.forget("n-0001", journal.jobs["n-0001"].length)
        await until(
            lambda: (
                store.writes == 1
                and feeder.offloader is not None
                and feeder.offloader.stats.deleted == 1
            ),
            "payload deleted",
        )
        feeder.stop()
        await task

    run(body)


def test_large_jobs_wait_while_the_store_is_down_and_small_ones_flow() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        store = MemoryStore(clock=clock)
        store.unavailable = True
        feeder = make(server, journal, clock, store)
        offloader = feeder.offloader
        assert offloader is not None
        task = asyncio.create_task(feeder.run())
        small = Job("n-0100", "small", 1, 10000, 0, 60, 1_700_000_000.0)
        feeder.submit([journal.add(big(1)), journal.add(big(2)), journal.add(small)])
        await until(lambda: feeder.stats.fed == 1, "small fed")
        await until(lambda: not offloader.stats.store_available, "store marked down")
        assert offloader.pending == 2
        store.unavailable = False
        await until(lambda: feeder.stats.fed == 3, "large fed once the store is back")
        assert store.writes == 2
        # beanstalkd loses everything: the large ones are fed again, not stored twice
        server.restart(lose_jobs=True)
        await until(lambda: feeder.stats.refed == 3 and feeder.stats.fed == 6, "re-fed")
        assert store.writes == 2
        feeder.stop()
        await task

    run(body)


def test_collect_removes_only_old_orphans_of_this_node() -> None:
    async def body() -> None:
        server, journal, clock = FakeBeanstalk(), FakeJournal(), ManualClock()
        store = MemoryStore(clock=clock)
        feeder = make(server, journal, clock, store)
        assert feeder.offloader is not None
        journal.add(big(1))
        await store.put("n-0001", b"live job")
        await store.put("n-0002", b"finished job")
        await store.put("other-0003", b"another server's")
        clock.advance(100)
        await store.put("n-0004", b"finished, but too fresh")
        assert await feeder.offloader.collect(window=50) == 1
        assert await store.list_older_than(0, clock.time() + 1) == [
            "n-0001",
            "n-0004",
            "other-0003",
        ]

    run(body)


class FaultyStore(MemoryStore):
    """A MemoryStore whose puts raise `failure` while it is set, or wait for `gate`."""

    def __init__(self, *, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.failure: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def put(self, key: str, data: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        if self.gate is not None:
            await self.gate.wait()
        await super().put(key, data)


def test_why_says_why_large_jobs_wait_whatever_keeps_them() -> None:
    async def body() -> None:
        journal, clock = FakeJournal(), ManualClock()
        store = FaultyStore(clock=clock)
        stored: list[str] = []
        offloader = Offloader(store, journal, clock, lambda j, _: stored.append(j.id), node="n")
        task = asyncio.create_task(offloader.run())
        assert offloader.why == ""
        store.gate = asyncio.Event()  # a put that takes its time
        journal.add(big(1))
        offloader.submit("n-0001")
        await until(lambda: offloader.pending == 1, "submitted")
        assert offloader.why == "their payloads are being written to the bulk store"
        store.gate.set()
        await until(lambda: stored == ["n-0001"], "stored")
        assert offloader.why == ""
        # an error other than StoreUnavailable (a bug, a journal read error): retried too
        store.failure = RuntimeError("not a store error")
        journal.add(big(2))
        offloader.submit("n-0002")
        await until(lambda: offloader.stats.last_error != "", "the put failed")
        assert offloader.pending == 1
        assert offloader.stats.store_available  # nothing said the store was down ...
        assert "RuntimeError: not a store error" in offloader.why  # ... yet a job waits
        store.failure = StoreUnavailable("no route to the store")
        await until(lambda: not offloader.stats.store_available, "store marked down")
        assert offloader.why == "bulk store unavailable: no route to the store"
        store.failure = None
        await until(lambda: stored == ["n-0001", "n-0002"], "stored once the store is back")
        assert offloader.pending == 0
        assert offloader.why == ""
        offloader.stop()
        await task

    run(body)


class UndeletableStore(MemoryStore):
    """A MemoryStore whose deletes always fail with an error that is not StoreUnavailable."""

    async def delete(self, key: str) -> None:
        raise RuntimeError(f"cannot delete {key}")


def test_a_delete_that_keeps_failing_is_dropped_and_does_not_hold_up_storing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        journal, clock = FakeJournal(), ManualClock()
        store = UndeletableStore(clock=clock)
        stored: list[str] = []
        offloader = Offloader(store, journal, clock, lambda j, _: stored.append(j.id), node="n")
        task = asyncio.create_task(offloader.run())
        offloader.forget("n-0009")  # a finished job's payload: the delete fails
        journal.add(big(1))
        offloader.submit("n-0001")
        await until(lambda: stored == ["n-0001"], "stored despite the failing delete")
        assert offloader.stats.deleted == 0
        assert "cannot delete n-0009" in caplog.text
        offloader.stop()
        await task

    run(body)


class SteppedClock(ManualClock):
    """A ManualClock whose `sleep` returns only when the test calls `step()`."""

    def __init__(self) -> None:
        super().__init__()
        self._steps = asyncio.Semaphore(0)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await self._steps.acquire()
        self.now += seconds

    async def step(self, times: int = 1) -> None:
        """End the current sleep and wait until the sleeper sleeps again, `times` times."""
        for _ in range(times):
            self._steps.release()
            await until(self._slept_more(len(self.slept)), "the next sleep")

    def _slept_more(self, sleeps: int) -> Callable[[], bool]:
        return lambda: len(self.slept) > sleeps


async def never_connect() -> FeedConnection:
    raise OSError("no beanstalkd in this test")


class TimedService(Service):
    """A Service that records the clock time of every `gc` run."""

    gc_runs: list[float]
    bugs = 0  # the next runs fail with an error that is not Unavailable

    async def gc(self) -> dict[str, Any]:
        self.gc_runs.append(self.clock.time())
        if self.bugs:
            self.bugs -= 1
            raise RuntimeError("a bug in gc")
        return await super().gc()


def test_collect_orphans_collects_old_orphans_every_interval_and_survives_outages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's periodic collection (kqs.app.collect_orphans, gc_interval 10 s,
    gc_window 60 s): a finished job's payload goes at the first run after it is older
    than the window, never before; live jobs' and other nodes' payloads stay; a run that
    finds the store unavailable is skipped, and the next one collects."""

    async def body() -> None:
        clock = SteppedClock()
        t0 = clock.time()
        store = MemoryStore(clock=clock)
        journal = Journal.open(tmp_path / "journal")
        live = big(1)
        await journal.append_inserts([(live.id, live.body())])
        feeder = Feeder(journal, never_connect, clock, store=store, node="n")
        ids = IdGenerator("n", clock)
        service = TimedService(journal, feeder, ids, clock, gc_window=60)
        service.gc_runs = []
        for key in (live.id, "n-0002", "other-0003"):
            await store.put(key, b"payload")
        collector = asyncio.create_task(app.collect_orphans(service, clock, 10))
        try:
            await until(lambda: clock.slept == [10], "the first sleep")
            assert service.gc_runs == []  # the first run comes after one interval
            await clock.step(6)  # t0 + 60: not older than the window yet
            assert store.keys() == [live.id, "n-0002", "other-0003"]
            await clock.step()  # t0 + 70
            assert store.keys() == [live.id, "other-0003"]
            await store.put("n-0004", b"finished later")
            store.unavailable = True
            await clock.step(8)  # t0 + 150: runs fail, the collector goes on
            assert "orphan collection skipped" in caplog.text
            store.unavailable = False
            service.bugs = 1
            await clock.step()  # t0 + 160: a bug, logged; the collector goes on
            assert "orphan collection failed" in caplog.text
            await clock.step()  # t0 + 170
            assert store.keys() == [live.id, "other-0003"]
            assert service.gc_runs == [t0 + 10 * n for n in range(1, 18)]
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            await journal.close()

    caplog.set_level(logging.WARNING, logger="kqs")
    run(body)
