"""Large bodies through the bulk store (in-memory twin; the real stores: tests/integration)."""

from __future__ import annotations

import asyncio

import orjson

from kqs.clock import ManualClock
from kqs.feeder import Feeder
from kqs.model import Job
from kqs.store import MemoryStore
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
