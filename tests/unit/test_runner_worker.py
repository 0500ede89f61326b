"""The worker loop against an in-memory beanstalkd tube (real ones: tests/integration)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from kqs.beanstalk import DeadlineSoon, JobInfo, ReservedJob
from kqs.runner import Fail, JobContext, Retry
from kqs.runner.config import PythonTarget, TypeConfig
from kqs.runner.handlers import PythonHandler, ThreadPool
from kqs.runner.lanes import Slots
from kqs.runner.reporter import FinishItem
from kqs.runner.retry import RetryPolicy
from kqs.runner.worker import TubeWorker


@dataclass
class FakeJob:
    body: bytes
    pri: int = 10000
    ttr: int = 30
    reserves: int = 0
    state: str = "ready"
    delay: int = 0


@dataclass
class FakeTube:
    """One tube; `log` records the commands that change a job, in order."""

    jobs: dict[int, FakeJob] = field(default_factory=dict)
    log: list[tuple[str, int]] = field(default_factory=list)
    next_id: int = 1

    def put(self, job_id: str, data: Any = None, **fields: Any) -> int:
        bid = self.next_id
        self.next_id += 1
        body = orjson.dumps({"id": job_id, "type": "t", "data": data, "ttr": 30})
        self.jobs[bid] = FakeJob(body, **fields)
        return bid

    def ready(self) -> list[int]:
        return [bid for bid, j in self.jobs.items() if j.state == "ready"]


class FakeConnection:
    def __init__(self, tube: FakeTube) -> None:
        self.tube = tube
        self.closed = False

    @property
    def broken(self) -> bool:
        return self.closed

    def _take(self) -> ReservedJob | None:
        ready = self.tube.ready()
        if not ready:
            return None
        job = self.tube.jobs[ready[0]]
        job.state = "reserved"
        job.reserves += 1
        return ReservedJob(ready[0], job.body)

    async def reserve(self, timeout: int) -> ReservedJob | DeadlineSoon | None:  # noqa: ASYNC109
        for _ in range(20):
            got = self._take()
            if got is not None:
                return got
            await asyncio.sleep(0.001)
        return None

    async def reserve_batch(self, n: int) -> list[ReservedJob]:
        await asyncio.sleep(0)
        return [j for j in (self._take() for _ in range(n)) if j is not None]

    async def stats_tube(self, tube: str) -> dict[str, str | int | float] | None:
        return {"current-jobs-ready": len(self.tube.ready())}

    async def job_info_batch(self, ids: Sequence[int]) -> list[JobInfo | None]:
        jobs = self.tube.jobs
        return [
            JobInfo(jobs[i].pri, jobs[i].ttr, jobs[i].reserves) if i in jobs else None for i in ids
        ]

    def _mine(self, id: int, verb: str) -> FakeJob | None:
        self.tube.log.append((verb, id))
        job = self.tube.jobs.get(id)
        return job if job is not None and job.state == "reserved" else None

    async def delete_batch(self, ids: Sequence[int]) -> list[bool]:
        return [await self.delete(i) for i in ids]

    async def delete(self, id: int) -> bool:
        if self._mine(id, "delete") is None:
            return False
        del self.tube.jobs[id]
        return True

    async def release(self, id: int, *, prio: int, delay: int) -> bool:
        job = self._mine(id, "release")
        if job is None:
            return False
        job.state, job.delay = ("delayed" if delay else "ready"), delay
        return True

    async def bury(self, id: int, *, prio: int) -> bool:
        job = self._mine(id, "bury")
        if job is None:
            return False
        job.state = "buried"
        return True

    async def touch(self, id: int) -> bool:
        return self._mine(id, "touch") is not None

    async def kick_job(self, id: int) -> bool:
        return False

    async def close(self) -> None:
        self.closed = True


class Reports:
    """Collects reports; acknowledges them when told to (or at once with `auto`)."""

    def __init__(self, auto: bool = True) -> None:
        self.items: list[FinishItem] = []
        self.auto = auto

    def __call__(self, item: FinishItem) -> None:
        self.items.append(item)
        if self.auto:
            self.ack_all()

    def ack_all(self) -> None:
        for item in self.items:
            if item.on_settled is not None:
                item.on_settled()


def make_worker(
    tube: FakeTube,
    handler: Callable[[JobContext], Any],
    reports: Reports,
    *,
    policy: RetryPolicy | None = None,
    concurrency: int = 4,
    timeout: float | None = None,
    **options: Any,
) -> TubeWorker:
    """A worker of type "t" on `tube`, its sync calls in a pool wired to its slots as the
    runner wires them; `options` go to TubeWorker."""
    config = TypeConfig("t", PythonTarget("x:y"), concurrency, timeout, policy or RetryPolicy())
    slots = Slots(concurrency)
    pool = ThreadPool(concurrency, name="t", hold=slots.hold)

    async def connect(refresh: bool) -> FakeConnection:
        return FakeConnection(tube)

    return TubeWorker(
        config,
        PythonHandler(handler, pool),
        slots,
        connect,
        reports,
        name="t@test",
        poll_interval=0.001,
        **options,
    )


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Yield to the loop until `predicate` holds; TimeoutError after `seconds`."""
    for _ in range(int(seconds / 0.001)):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise TimeoutError(f"still false after {seconds} s: {predicate}")


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_done_is_reported_before_the_delete_and_attempts_come_from_reserves() -> None:
    async def test() -> None:
        tube = FakeTube()
        seen: list[tuple[str, int, Any]] = []
        first = tube.put("n1-1", {"a": 1})
        second = tube.put("n1-2", [1], reserves=2)  # reserved twice before: attempt 3

        async def handler(job: JobContext) -> None:
            seen.append((job.id, job.attempt, job.data))

        reports = Reports(auto=False)
        worker = make_worker(tube, handler, reports)
        task = asyncio.create_task(worker.run())
        await until(lambda: len(reports.items) == 2)
        assert sorted(seen) == [("n1-1", 1, {"a": 1}), ("n1-2", 3, [1])]
        assert [(i.id, i.outcome) for i in reports.items] == [("n1-1", "done"), ("n1-2", "done")]
        assert not [c for c in tube.log if c[0] == "delete"]  # not before the acknowledgement
        reports.ack_all()
        await until(lambda: not tube.jobs)
        assert sorted(tube.log) == [("delete", first), ("delete", second)]
        worker.stop_reserving()
        await task

    run(test)


def test_failures_are_released_with_backoff_then_dead_after_max_attempts() -> None:
    async def test() -> None:
        tube = FakeTube()
        bid = tube.put("n1-1")

        def handler(job: JobContext) -> None:
            raise ValueError(f"attempt {job.attempt}")

        reports = Reports()
        policy = RetryPolicy(max_attempts=3, base=5, jitter=0)
        worker = make_worker(tube, handler, reports, policy=policy)
        task = asyncio.create_task(worker.run())
        job = tube.jobs[bid]
        await until(lambda: job.state == "delayed")
        assert (job.reserves, job.delay) == (1, 5) and not reports.items  # retries: no report
        job.state = "ready"  # the delay is over
        await until(lambda: job.state == "delayed" and job.reserves == 2)
        assert job.delay == 10
        job.state = "ready"
        await until(lambda: job.state == "buried")
        assert [c[0] for c in tube.log] == ["release", "release", "bury"]
        (dead,) = reports.items
        assert (dead.outcome, dead.error, dead.attempts) == ("dead", "ValueError: attempt 3", 3)
        worker.stop_reserving()
        await task

    run(test)


def test_retry_with_a_delay_and_fail() -> None:
    async def test() -> None:
        tube = FakeTube()
        later = tube.put("n1-1", "later")
        never = tube.put("n1-2", "never")

        def handler(job: JobContext) -> None:
            if job.data == "later":
                raise Retry("busy", delay=42)
            raise Fail("bad input")

        reports = Reports()
        worker = make_worker(tube, handler, reports)
        task = asyncio.create_task(worker.run())
        await until(lambda: tube.jobs[never].state == "buried")
        await until(lambda: tube.jobs[later].state == "delayed")
        assert tube.jobs[later].delay == 42
        assert [(i.id, i.outcome, i.error) for i in reports.items] == [
            ("n1-2", "dead", "Fail: bad input")
        ]
        worker.stop_reserving()
        await task

    run(test)


def test_a_job_reserved_twice_past_its_attempts_is_dead_without_running() -> None:
    async def test() -> None:
        tube = FakeTube()
        bid = tube.put("n1-1", reserves=4)  # the 5th reservation of a 3-attempt job
        ran: list[str] = []
        reports = Reports()
        worker = make_worker(
            tube, lambda job: ran.append(job.id), reports, policy=RetryPolicy(max_attempts=3)
        )
        task = asyncio.create_task(worker.run())
        await until(lambda: tube.jobs[bid].state == "buried")
        assert not ran
        (dead,) = reports.items
        assert dead.attempts == 5 and dead.error is not None
        assert dead.error.startswith("no attempts left")
        worker.stop_reserving()
        await task

    run(test)


def test_a_job_whose_last_outcome_was_lost_runs_once_more() -> None:
    """Reserved for attempt max_attempts + 1 (say attempt 3 succeeded but its done report
    was never acknowledged), a job runs again: done now is done; a failure is final."""

    async def test() -> None:
        tube = FakeTube()
        succeeds = tube.put("n1-1", "ok", reserves=3)  # the 4th reservation, 3 attempts
        fails = tube.put("n1-2", "fail", reserves=3)
        ran: list[tuple[str, int]] = []

        def handler(job: JobContext) -> None:
            ran.append((job.id, job.attempt))
            if job.data == "fail":
                raise Retry("still failing", delay=0)

        reports = Reports()
        worker = make_worker(tube, handler, reports, policy=RetryPolicy(max_attempts=3))
        task = asyncio.create_task(worker.run())
        await until(lambda: succeeds not in tube.jobs and tube.jobs[fails].state == "buried")
        assert sorted(ran) == [("n1-1", 4), ("n1-2", 4)]
        outcomes = {i.id: (i.outcome, i.error, i.attempts) for i in reports.items}
        assert outcomes == {"n1-1": ("done", None, None), "n1-2": ("dead", "still failing", 4)}
        worker.stop_reserving()
        await task

    run(test)


def test_a_sync_handler_past_its_timeout_keeps_its_slot_until_its_thread_returns() -> None:
    """Concurrency 1: while the thread of a timed-out run is still in the handler, no
    other job of the type is reserved (it would wait for a thread, its timeout running);
    once the thread returns, the next job runs at once."""

    async def test() -> None:
        tube = FakeTube()
        hung = tube.put("n1-1", "hang")
        later = tube.put("n1-2", "quick")
        release = threading.Event()
        ran: list[str] = []

        def handler(job: JobContext) -> None:
            ran.append(job.id)
            if job.data == "hang":
                release.wait(10)

        reports = Reports()
        policy = RetryPolicy(base=100, jitter=0)
        worker = make_worker(tube, handler, reports, policy=policy, concurrency=1, timeout=0.05)
        task = asyncio.create_task(worker.run())
        await until(lambda: tube.jobs[hung].state == "delayed")  # timed out: retry later
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert tube.jobs[later].reserves == 0 and ran == ["n1-1"]
        assert worker.slots.used == 1  # held by the thread still in the handler
        release.set()
        await until(lambda: later not in tube.jobs)
        assert ran == ["n1-1", "n1-2"]
        assert [(i.id, i.outcome) for i in reports.items] == [("n1-2", "done")]
        worker.stop_reserving()
        await task
        assert worker.slots.used == 0

    run(test)


def test_reserving_waits_while_too_many_reports_are_unacknowledged() -> None:
    async def test() -> None:
        tube = FakeTube()
        for n in range(10):
            tube.put(f"n1-{n}")

        async def handler(job: JobContext) -> None:
            pass

        reports = Reports(auto=False)
        worker = make_worker(tube, handler, reports, concurrency=1, max_unacked=3)
        task = asyncio.create_task(worker.run())
        await until(lambda: len(reports.items) == 3)
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert len(reports.items) == 3 and len(tube.ready()) == 7  # no more reserved
        reports.auto = True
        reports.ack_all()
        await until(lambda: not tube.jobs)
        assert len(reports.items) == 10
        worker.stop_reserving()
        await task

    run(test)


@pytest.mark.parametrize("is_async", [False, True])
def test_a_handler_touches_its_job(is_async: bool) -> None:
    """`await job.touch()` on the loop, `job.touch_sync()` from a sync handler's thread:
    beanstalkd sees a touch (the TTR of 30 s means no touch of the runner's own yet)."""

    async def test() -> None:
        tube = FakeTube()
        bid = tube.put("n1-1")
        touched: list[bool] = []

        def sync_handler(job: JobContext) -> None:
            touched.append(job.touch_sync())

        async def async_handler(job: JobContext) -> None:
            touched.append(await job.touch())

        reports = Reports()
        worker = make_worker(tube, async_handler if is_async else sync_handler, reports)
        task = asyncio.create_task(worker.run())
        await until(lambda: bid not in tube.jobs)
        assert touched == [True]
        assert tube.log == [("touch", bid), ("delete", bid)]
        worker.stop_reserving()
        await task

    run(test)


def test_concurrency_is_bounded_by_the_slots() -> None:
    async def test() -> None:
        tube = FakeTube()
        for n in range(20):
            tube.put(f"n1-{n}")
        running = 0
        most = 0
        release = asyncio.Event()

        async def handler(job: JobContext) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1

        reports = Reports()
        worker = make_worker(tube, handler, reports, concurrency=3)
        task = asyncio.create_task(worker.run())
        await until(lambda: running == 3)
        for _ in range(10):
            await asyncio.sleep(0.002)
        assert most == 3
        release.set()
        await until(lambda: not tube.jobs)
        assert most == 3 and len(reports.items) == 20
        worker.stop_reserving()
        await task

    run(test)


def test_abort_releases_running_jobs_at_once_and_abandon_leaves_unacked_ones() -> None:
    async def test() -> None:
        tube = FakeTube()
        slow = tube.put("n1-1", "slow")
        quick = tube.put("n1-2", "quick")

        async def handler(job: JobContext) -> None:
            if job.data == "slow":
                await asyncio.sleep(30)

        reports = Reports(auto=False)
        worker = make_worker(tube, handler, reports)
        task = asyncio.create_task(worker.run())
        await until(lambda: len(reports.items) == 1 and tube.jobs[slow].state == "reserved")
        worker.stop_reserving()
        worker.abort()
        await until(lambda: tube.jobs[slow].state == "ready")
        assert tube.jobs[slow].delay == 0 and ("release", slow) in tube.log
        worker.abandon()  # the quick job's report was never acknowledged
        await task
        assert tube.jobs[quick].state == "reserved"  # goes back when the connection closes
        assert ("delete", quick) not in tube.log

    run(test)
