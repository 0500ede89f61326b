"""Service: retry and purge of several dead jobs when journaling some of them fails (a
real journal in a temporary directory; a feeder that never reaches beanstalkd)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kqs.clock import ManualClock
from kqs.errors import DiskFull
from kqs.feeder import FeedConnection, Feeder
from kqs.journal import Journal
from kqs.model import IdGenerator
from kqs.service import Service


async def never_connect() -> FeedConnection:
    raise OSError("no beanstalkd in this test")


async def three_dead_jobs(tmp_path: Path) -> tuple[Service, Journal, list[str]]:
    clock = ManualClock()
    journal = Journal.open(tmp_path / "journal")
    service = Service(
        journal, Feeder(journal, never_connect, clock), IdGenerator("n", clock), clock
    )
    ids = await service.insert(service.parse_insert([{"type": "t", "data": i} for i in range(3)]))
    await service.finish([{"id": i, "outcome": "dead", "error": "boom"} for i in ids])
    return service, journal, ids


def failing_for(journal: Journal, method: str, bad: str) -> None:
    """Make `journal.<method>` fail with a full disk for job `bad` only."""
    real = getattr(journal, method)

    async def change(job_id: str) -> None:
        if job_id == bad:
            raise DiskFull("disk full")
        await real(job_id)

    setattr(journal, method, change)


@pytest.mark.parametrize("method", ["retry", "purge"])
def test_a_partial_failure_carries_out_the_rest_and_leaves_the_failed_one_dead(
    tmp_path: Path, method: str
) -> None:
    async def main() -> None:
        service, journal, ids = await three_dead_jobs(tmp_path)
        queued = service.feeder.pending
        change = "revive" if method == "retry" else "purge"
        done = "retried" if method == "retry" else "purged"
        failing_for(journal, change, ids[1])
        with pytest.raises(DiskFull, match=f"2 {done} nevertheless"):
            await getattr(service, method)({"ids": ids})
        assert [j["id"] for j in (await service.dead({}))["jobs"]] == [ids[1]]
        if method == "retry":  # the two revived are live and queued to be fed again
            assert all(journal.jobs[i].dead is None for i in (ids[0], ids[2]))
            assert service.feeder.pending == queued + 2
        else:
            assert set(journal.jobs) == {ids[1]}
        # once the disk has room, the failed one is free to be changed again
        delattr(journal, change)
        assert await getattr(service, method)({"id": ids[1]}) == {done: 1}
        await journal.close()

    asyncio.run(main())
