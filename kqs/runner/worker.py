"""One job type on one beanstalkd: reserve -> run -> delete / release / bury -> report.

A `TubeWorker` keeps one connection watching only its type's tube (beanstalkd lets a
reserved job be deleted, released, touched or buried only over the connection that
reserved it). The loop:

- takes free slots from the type's `Slots` (shared by the type's workers on every server,
  so a type runs at most `concurrency` jobs in this process); a full type waits for a
  slot to be given back;
- reserves nothing while `max_unacked` (MAX_UNACKED) of its jobs await the
  acknowledgement of their report (a kqs server unreachable while beanstalkd is not):
  it waits for acknowledgements, so it never holds more than concurrency + max_unacked
  jobs;
- when nothing of this connection is running, blocks in `reserve-with-timeout 1` (one
  slot held meanwhile): a blocking reserve holds up every later command on its
  connection, so it is only sent when no delete, release or touch can be waiting behind
  it, and the one-second timeout means it never waits for ever on a dead connection and
  hands the slot round among servers;
- when jobs of this connection are running, asks `stats-tube` how many jobs are ready
  and pipelines that many (at most one per free slot) `reserve-with-timeout 0` in one
  write (again without asking while the last batch came back full); when none is ready
  it waits for a job of this connection to end, or `poll_interval`;
- then pipelines one `stats-job` per job got: the attempt number is beanstalkd's
  `reserves` count, so it survives a runner crash.

Each job runs in its own task: while its handler runs it is touched about every TTR/2;
then `decide` (kqs.runner.retry) says delete (done), release with a delay (retry) or
bury (dead). A retry is released at once. Done and dead are first reported to the job's
owner (through `report`, batched) and carried out in beanstalkd once the report is
acknowledged, the job kept reserved (touched) meanwhile: a runner dying in between
leaves the job in beanstalkd, where it runs again, never a job kqs believes unfinished
that beanstalkd no longer has. The job's slot is free as soon as its handler is done.

On a broken connection the worker reconnects with backoff (asking its server again where
beanstalkd is); jobs reserved on the old connection went back to beanstalkd with it, and
whatever their handlers end with is still reported when it is final. `stop_reserving`
ends the loop; `abort` cancels running handlers and releases their jobs at once;
`abandon` stops waiting for acknowledgements (those jobs go back with the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson

from kqs.backoff import Backoff
from kqs.beanstalk import (
    BeanstalkError,
    BeanstalkUnavailable,
    BuriedError,
    DeadlineSoon,
    JobInfo,
    ReservedJob,
)
from kqs.client import RemoteError
from kqs.runner.config import TypeConfig
from kqs.runner.handlers import Handler, JobContext
from kqs.runner.kqsrpc import KqsUnavailable
from kqs.runner.lanes import Lane, Leases, Slot, Slots
from kqs.runner.outcome import Outcome
from kqs.runner.payload import is_reference, load_body, python_data
from kqs.runner.reporter import FinishItem
from kqs.runner.retry import Verdict, decide, exhausted_before_run
from kqs.store import BulkStore

log = logging.getLogger("kqs.runner.worker")

#: Seconds a blocking reserve waits (beanstalkd's unit) before the loop looks around.
BLOCKING_RESERVE = 1
#: Most reserves pipelined in one write.
MAX_RESERVE_BATCH = 256
#: Most jobs of one worker awaiting the acknowledgement of their done or dead report
#: (each kept reserved and touched meanwhile); at this many it reserves no more until
#: some are acknowledged.
MAX_UNACKED = 1024


class WorkConnection(Protocol):
    """What a worker needs of a beanstalkd connection (kqs.beanstalk.BeanstalkClient)."""

    @property
    def broken(self) -> bool: ...

    async def reserve(self, timeout: int) -> ReservedJob | DeadlineSoon | None: ...  # noqa: ASYNC109

    async def stats_tube(self, tube: str) -> dict[str, str | int | float] | None: ...

    async def reserve_batch(self, n: int) -> list[ReservedJob]: ...

    async def job_info_batch(self, ids: Sequence[int]) -> list[JobInfo | None]: ...

    async def delete_batch(self, ids: Sequence[int]) -> list[bool]: ...

    async def delete(self, id: int) -> bool: ...

    async def release(self, id: int, *, prio: int, delay: int) -> bool: ...

    async def bury(self, id: int, *, prio: int) -> bool: ...

    async def touch(self, id: int) -> bool: ...

    async def kick_job(self, id: int) -> bool: ...

    async def close(self) -> None: ...


#: Connects to the beanstalkd serving a type, watching only its tube; `True` asks the kqs
#: server again where its beanstalkd is (after a failure).
Connect = Callable[[bool], Awaitable[WorkConnection]]
Report = Callable[[FinishItem], None]
#: The bulk store holding a job's payload (by job id); ValueError if none can be used.
BulkFor = Callable[[str], BulkStore]

#: Failures of a connection attempt: beanstalkd or the kqs server answering `hello`.
CONNECT_ERRORS = (BeanstalkUnavailable, BeanstalkError, KqsUnavailable, RemoteError, OSError)


def _stat(stats: dict[str, str | int | float], key: str, default: int) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) else default


class TubeWorker:
    """Runs the jobs of one type from one beanstalkd; see the module docstring."""

    def __init__(
        self,
        config: TypeConfig,
        handler: Handler,
        slots: Slots,
        connect: Connect,
        report: Report,
        *,
        name: str,
        bulk: BulkFor | None = None,
        poll_interval: float = 0.05,
        max_batch: int = MAX_RESERVE_BATCH,
        max_unacked: int = MAX_UNACKED,
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.slots = slots
        self._connect = connect
        self._report = report
        self._bulk = bulk or _no_bulk
        self.name = name
        self.poll_interval = poll_interval
        self.max_batch = max_batch
        self.max_unacked = max_unacked
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._stopping = asyncio.Event()
        self._aborting = False
        self._lane: Lane[WorkConnection] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_handler: set[asyncio.Task[Any]] = set()
        self._awaiting_ack: set[asyncio.Future[bool]] = set()
        self._acks_came = asyncio.Event()  # set when a report is settled (or on stop)
        self._held_back = False  # reserving waits for acknowledgements (for the log)
        self._leases = Leases()
        self.started = 0
        self.connected = False
        self.last_error = ""

    @property
    def running(self) -> int:
        """Jobs of this worker not settled yet."""
        return len(self._tasks)

    @property
    def in_handler(self) -> int:
        """Jobs of this worker whose handler is running."""
        return len(self._in_handler)

    # -- control -------------------------------------------------------------------

    def stop_reserving(self) -> None:
        """Take no more jobs; running ones go on (see `abort`)."""
        self._stopping.set()
        self.slots.wake()
        self._acks_came.set()
        if self._lane is not None:
            self._lane.changed.set()

    def abort(self) -> None:
        """Cancel every running handler; their jobs are released for another runner."""
        self._aborting = True
        for task in list(self._in_handler):
            task.cancel()

    def abandon(self) -> None:
        """Stop waiting for reports to be acknowledged: those jobs stay in beanstalkd and
        go back to ready when the connection closes (they run again)."""
        for acked in list(self._awaiting_ack):
            if not acked.done():
                acked.set_result(False)

    async def run(self) -> None:
        """Serve until `stop_reserving`; then wait for this worker's jobs to settle and
        close the connection. Never raises for beanstalkd or kqs trouble."""
        leases = asyncio.create_task(self._leases.run(), name=f"{self.name} leases")
        try:
            await self._run()
        finally:
            leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leases
            await self._leases.close()

    async def _run(self) -> None:
        refresh = False
        while not self._stopping.is_set():
            try:
                conn = await self._connect(refresh)
            except CONNECT_ERRORS as exc:
                self._failed(f"cannot connect: {exc}")
                refresh = True
                await self._pause(self._backoff.next())
                continue
            lane = self._lane = Lane(conn)
            self.connected = True
            try:
                await self._serve(lane)
            except (BeanstalkUnavailable, BeanstalkError) as exc:
                self._failed(str(exc))
                await conn.close()
                refresh = True
                await self._pause(self._backoff.next())
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._lane is not None:
            await self._lane.conn.close()
        self.connected = False

    def _failed(self, why: str) -> None:
        self.connected = False
        self.last_error = why
        log.warning("%s: %s; retrying", self.name, why)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if asked to stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # -- the reserve loop ------------------------------------------------------------

    async def _serve(self, lane: Lane[WorkConnection]) -> None:
        """Reserve and start jobs on `lane` until stopping; BeanstalkUnavailable if the
        connection breaks."""
        first = True
        ready_hint = 0  # jobs believed ready: reserve without asking stats-tube first
        while not self._stopping.is_set():
            if lane.conn.broken:
                raise BeanstalkUnavailable(f"{self.name}: connection lost")
            if self.slots.free <= 0:
                await self.slots.wait()
                continue
            if len(self._awaiting_ack) >= self.max_unacked:
                await self._wait_for_acks()
                continue
            if lane.inflight == 0 and ready_hint <= 0:
                jobs = await self._reserve_blocking(lane)
            else:
                want = min(self.slots.free, self.max_batch)
                if ready_hint <= 0:
                    ready_hint = await self._ready_count(lane)
                want = min(want, ready_hint)
                jobs = await self._reserve(lane, want) if want > 0 else []
                ready_hint = ready_hint - len(jobs) if len(jobs) == want else 0
                if not jobs:
                    # Look again when a job of this lane ends, or after a while.
                    lane.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_interval):
                            await lane.changed.wait()
                    continue
            if first:
                self._backoff.reset()
                first = False
            if jobs:
                await self._start(lane, jobs)

    async def _wait_for_acks(self) -> None:
        """Wait until a report of this worker is settled (or stopping): too many of its
        jobs await acknowledgement to reserve more."""
        if not self._held_back:  # said once until half of them are acknowledged
            self._held_back = True
            log.warning(
                "%s: %d finished job(s) await the acknowledgement of their report;"
                " reserving no more until some are acknowledged",
                self.name,
                len(self._awaiting_ack),
            )
        self._acks_came.clear()
        await self._acks_came.wait()

    async def _ready_count(self, lane: Lane[WorkConnection]) -> int:
        """How many jobs are ready in this worker's tube now."""
        stats = await lane.conn.stats_tube(self.config.name)
        return _stat(stats, "current-jobs-ready", 0) if stats is not None else 0

    async def _reserve(self, lane: Lane[WorkConnection], n: int) -> list[ReservedJob]:
        """Pipeline `n` non-blocking reserves; keep one slot per job got."""
        n = self.slots.take(n)
        got: list[ReservedJob] = []
        try:
            got = await lane.conn.reserve_batch(n)
        finally:
            if n > len(got):
                self.slots.give(n - len(got))
        return got

    async def _reserve_blocking(self, lane: Lane[WorkConnection]) -> list[ReservedJob]:
        """Wait up to BLOCKING_RESERVE seconds for one job (nothing else is pending on
        this connection, so nothing waits behind the reserve); give up at once when
        asked to stop. The job got keeps the slot taken for it."""
        if self.slots.take(1) == 0:
            return []
        reserve = asyncio.ensure_future(lane.conn.reserve(BLOCKING_RESERVE))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({reserve, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not reserve.done():
            # Stopping. A job beanstalkd still hands to this reserve goes back to it when
            # the connection closes, at once: no job runs on this connection.
            reserve.cancel()
            self.slots.give(1)
            await lane.conn.close()
            return []
        try:
            result = reserve.result()
        except BaseException:
            self.slots.give(1)
            raise
        if isinstance(result, ReservedJob):
            return [result]
        self.slots.give(1)  # TIMED_OUT (DEADLINE_SOON cannot be: nothing is reserved here)
        return []

    async def _start(self, lane: Lane[WorkConnection], jobs: list[ReservedJob]) -> None:
        """Learn each job's attempt number and TTR (one pipelined write), then start it.
        Each job holds its slot from here until its handler is done."""
        try:
            infos = await lane.conn.job_info_batch([j.id for j in jobs])
        except BaseException:
            self.slots.give(len(jobs))
            raise
        for job, info in zip(jobs, infos, strict=True):
            if info is None:  # gone already (deleted by an operator)
                self.slots.give(1)
                continue
            lane.inflight += 1
            self.started += 1
            task = asyncio.create_task(self._job(lane, job, info))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one job ---------------------------------------------------------------------

    async def _job(self, lane: Lane[WorkConnection], reserved: ReservedJob, info: JobInfo) -> None:
        """Run one reserved job to its verdict and carry it out, keeping it reserved (in
        `Leases`) meanwhile; its slot is given back as soon as its handler is done."""
        slot = Slot(self.slots)
        touch = _toucher(lane.conn, reserved.id)
        lease = self._leases.hold(touch, info.ttr)
        try:
            await self._job_inner(lane, reserved, info, touch, slot)
        except Exception:
            log.exception(
                "%s: job %d: unexpected error (it runs again after its TTR)", self.name, reserved.id
            )
        finally:
            self._leases.let_go(lease)
            slot.give()
            lane.inflight -= 1
            lane.changed.set()

    async def _job_inner(
        self,
        lane: Lane[WorkConnection],
        reserved: ReservedJob,
        info: JobInfo,
        touch: Callable[[], Awaitable[bool]],
        slot: Slot,
    ) -> None:
        bid, prio = reserved.id, info.pri
        raw = reserved.body
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise ValueError("not a kqs job body (an object with a string 'id')")
        except ValueError as exc:
            log.error("%s: beanstalkd job %d is not a kqs job (%s); buried", self.name, bid, exc)
            await self._apply(lane, bid, prio, Verdict("bury"))
            return
        job_id: str = body["id"]
        attempt = max(1, info.reserves)
        policy = self.config.retry
        outcome: Outcome | None = None
        if exhausted_before_run(policy, attempt):
            outcome = Outcome.dead(
                f"no attempts left: reserved {attempt} times, max_attempts is"
                f" {policy.max_attempts} (+1 when an outcome is lost); the last runs ended"
                " without an outcome (runner crash, lost connection or shutdown)"
            )
        elif is_reference(body):
            loaded = await self._load_bulk(job_id)
            if isinstance(loaded, Outcome):
                outcome = loaded
            else:
                raw, body = loaded
        ctx = JobContext(
            id=job_id,
            type=self.config.name,
            data=python_data(raw, body.get("data")) if outcome is None else None,
            attempt=attempt,
            ttr=max(1, info.ttr),
            touch=touch,
            max_attempts=policy.max_attempts,
            prio=prio,
            loop=asyncio.get_running_loop(),
        )
        if outcome is None:
            outcome = await self._run_handler(ctx, body)
            if outcome is None:  # aborted at shutdown: hand it back for another runner now
                await self._apply(lane, bid, prio, Verdict("release"))
                return
        slot.give()
        verdict = decide(policy, outcome.kind, attempt, delay=outcome.delay)
        self._log_failure(ctx, outcome, verdict)
        # A retry is released at once; done and dead wait for the report's acknowledgement.
        if verdict.action == "release" or await self._reported(ctx, outcome):
            await self._apply(lane, bid, prio, verdict)

    async def _load_bulk(self, job_id: str) -> tuple[bytes, dict[str, Any]] | Outcome:
        """The full body of a job fed as a bulk reference (and its bytes), or the outcome
        of failing to fetch it."""
        try:
            store = self._bulk(job_id)
        except ValueError as exc:
            return Outcome.retry(f"cannot use the bulk store: {exc}")
        return await load_body(store, job_id)

    async def _run_handler(self, ctx: JobContext, body: dict[str, Any]) -> Outcome | None:
        """The handler's outcome; None if aborted."""
        task = asyncio.current_task()
        if self._aborting or task is None:
            return None
        self._in_handler.add(task)
        try:
            return await self.handler.run(ctx, body, self.config.timeout)
        except asyncio.CancelledError:
            if not self._aborting:
                raise
            task.uncancel()
            return None
        finally:
            self._in_handler.discard(task)

    async def _reported(self, ctx: JobContext, outcome: Outcome) -> bool:
        """Report done or dead to the job's owner and wait until it is acknowledged,
        keeping the job reserved meanwhile. True once acknowledged; False if abandoned at
        shutdown (the job then goes back to beanstalkd with the connection, and runs again).

        Reporting before deleting (or burying) means a runner that dies in between leaves
        the job in beanstalkd, where it runs again, and never a job that kqs believes
        unfinished but beanstalkd no longer has."""
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[bool] = loop.create_future()
        self._awaiting_ack.add(acked)

        def settled() -> None:
            if not acked.done():
                acked.set_result(True)

        if outcome.kind == "done":
            item = FinishItem(ctx.id, "done", ctx.type, on_settled=settled)
        else:
            item = FinishItem(ctx.id, "dead", ctx.type, outcome.error, ctx.attempt, settled)
        try:
            self._report(item)
            return await acked
        finally:
            self._awaiting_ack.discard(acked)
            self._acks_came.set()
            if self._held_back and len(self._awaiting_ack) <= self.max_unacked // 2:
                self._held_back = False
                log.info("%s: reports are acknowledged again", self.name)

    async def _apply(
        self, lane: Lane[WorkConnection], bid: int, prio: int, verdict: Verdict
    ) -> None:
        """Carry out a verdict in beanstalkd. If the reservation is lost (connection gone,
        or not reserved here any more), beanstalkd has the job back and it runs again."""
        conn = lane.conn
        try:
            if verdict.action == "delete":
                ok = await lane.delete(bid)
            elif verdict.action == "release":
                try:
                    ok = await conn.release(bid, prio=prio, delay=verdict.delay)
                except BuriedError:  # beanstalkd ran out of memory: back to ready, no delay
                    ok = await conn.kick_job(bid)
            else:
                ok = await conn.bury(bid, prio=prio)
        except (BeanstalkUnavailable, BeanstalkError) as exc:
            log.warning(
                "%s: cannot %s job %d (%s); it will run again", self.name, verdict.action, bid, exc
            )
            return
        if not ok:
            log.warning("%s: job %d was no longer reserved here; it will run again", self.name, bid)

    def _log_failure(self, ctx: JobContext, outcome: Outcome, verdict: Verdict) -> None:
        if verdict.action == "release":
            log.warning(
                "%s: job %s attempt %d/%d failed, retry in %d s: %s",
                self.name,
                ctx.id,
                ctx.attempt,
                ctx.max_attempts,
                verdict.delay,
                outcome.error,
            )
        elif verdict.action == "bury":
            log.error(
                "%s: job %s is dead after attempt %d/%d: %s",
                self.name,
                ctx.id,
                ctx.attempt,
                ctx.max_attempts,
                outcome.error,
            )


def _toucher(conn: WorkConnection, bid: int) -> Callable[[], Awaitable[bool]]:
    """`touch()` for one job: True if it is still reserved here (its TTR restarts)."""

    async def touch() -> bool:
        try:
            return await conn.touch(bid)
        except (BeanstalkUnavailable, BeanstalkError):
            return False

    return touch


def _no_bulk(job_id: str) -> BulkStore:
    raise ValueError("no bulk store is known for this job's server")
