"""The feeder: moves journaled jobs into beanstalkd, and feeds again what it has lost.

Contract:
- Only journaled (acknowledged) jobs are fed; the journal stays the source of truth.
- Puts are pipelined in batches on one connection (`put_batch`), so feeding keeps up
  with group-committed inserts.
- While beanstalkd is unreachable, jobs wait in the queue and the feeder reconnects
  with backoff. A put whose reply was lost is put again (at-least-once).
- For every unfinished job the journal keeps the beanstalkd id that carries it. On the
  first connection, and whenever beanstalkd turns out to be a new process (its `stats`
  id or pid changed), every such job is checked with `peek`; a job that beanstalkd no
  longer has (or whose id now carries another body) is fed again.
- A body larger than beanstalkd's `max-job-size` goes through the bulk store first
  (kqs/offload.py) and a small reference is fed instead; with no store it is set aside,
  counted and reported.
- Put outcomes other than INSERTED are handled on purpose: BURIED (beanstalkd could not
  grow its queue) is kicked back to ready if the job is due (a delayed one's copy is
  deleted and it is put again after a backoff, its delay kept), and if the kick fails
  the buried copy is deleted and the job put again; DRAINING and OUT_OF_MEMORY back
  off and retry; JOB_TOO_BIG goes the large-body way above.
- Stale copies (of retried or purged dead jobs, of failed kicks, zeroed husks) are
  deleted on the feeder's connection as kqs/stale.py says: only while they still carry
  that copy, and again later if a runner holds one.
- An unexpected exception is logged with its traceback and feeding starts over on a new
  connection after a backoff: the feeder never stops silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kqs.backoff import Backoff
from kqs.beanstalk import BeanstalkError, BeanstalkUnavailable, PutItem, PutResult
from kqs.clock import Clock
from kqs.model import Job
from kqs.offload import Offloader
from kqs.stale import StaleCopies, StaleCopy, carries, zeroed
from kqs.store import BulkStore

log = logging.getLogger("kqs.feeder")


class FedEntry(Protocol):
    bid: int
    dead: bytes | None
    length: int


class FeedJournal(Protocol):
    """What the feeder needs of the journal."""

    @property
    def jobs(self) -> Mapping[str, FedEntry]: ...

    def note_fed_many(self, fed: Sequence[tuple[str, int]]) -> None: ...

    async def read_bodies(self, job_ids: Sequence[str]) -> list[bytes]: ...


class FeedConnection(Protocol):
    """What the feeder needs of a beanstalkd connection."""

    @property
    def broken(self) -> bool: ...

    async def put_batch(self, items: Sequence[PutItem]) -> list[PutResult]: ...

    async def peek_batch(self, ids: Sequence[int]) -> list[bytes | None]: ...

    async def kick_job(self, job_id: int) -> bool: ...

    async def stats(self) -> dict[str, str | int | float]: ...

    async def delete(self, job_id: int) -> bool: ...

    async def stats_job(self, job_id: int) -> dict[str, str | int | float] | None: ...

    async def list_tubes(self) -> list[str]: ...

    async def stats_tube(self, tube: str) -> dict[str, str | int | float] | None: ...

    async def close(self) -> None: ...


Connect = Callable[[], Awaitable[FeedConnection]]


@dataclass(slots=True)
class FeedItem:
    """A job ready to put: what beanstalkd needs, and its due time (insert time + delay)."""

    job_id: str
    tube: str
    prio: int
    ttr: int
    due: float
    body: bytes

    @staticmethod
    def of(job: Job, body: bytes) -> FeedItem:
        return FeedItem(job.id, job.type, job.prio, job.ttr, job.ts + job.delay, body)


@dataclass(slots=True)
class FeederStats:
    fed: int = 0
    refed: int = 0
    buried_on_put: int = 0
    too_big: int = 0
    put_retries: int = 0
    reconnects: int = 0
    verified: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _PutOutcome:
    """A batch's put results, sorted: fed as (job id, bid), buried as (item, bid), and
    items to put again."""

    fed: list[tuple[str, int]]
    buried: list[tuple[FeedItem, int]]
    retry: list[FeedItem]


class Feeder:
    def __init__(
        self,
        journal: FeedJournal,
        connect: Connect,
        clock: Clock,
        *,
        batch: int = 1000,
        heartbeat: float = 1.0,
        max_buffered_bodies: int = 100_000,
        backoff: Backoff | None = None,
        store: BulkStore | None = None,
        node: str = "",
        max_body: int = 65535,
    ) -> None:
        self._journal = journal
        self._connect = connect
        self._clock = clock
        self._batch = batch
        self._heartbeat = heartbeat
        self._max_buffered = max_buffered_bodies
        self._backoff = backoff or Backoff()
        # A queued job is either a ready FeedItem or just its id (body read from the journal).
        self._queue: deque[FeedItem | str] = deque()
        self._in_batch = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._client: FeedConnection | None = None
        self._instance: tuple[object, object] | None = None
        self._verify = True
        self.stale = StaleCopies(lambda: journal.jobs, clock)
        self.too_big: dict[str, str] = {}
        self.stats = FeederStats()
        self._smallest_limit = max_body
        # jobs offloaded because beanstalkd answered JOB_TOO_BIG (maybe within max_body)
        self._refused_big: set[str] = set()
        self.max_body = max_body
        self.offloader = (
            Offloader(store, journal, clock, self._offloaded, node=node) if store else None
        )

    # -- what the service calls ------------------------------------------------------

    def submit(self, items: Iterable[FeedItem]) -> None:
        """Queue freshly journaled jobs for feeding."""
        for item in items:
            self._queue.append(item if len(self._queue) < self._max_buffered else item.job_id)
        self._idle.clear()
        self._wake.set()

    def resubmit(self, job_ids: Iterable[str]) -> None:
        """Queue journaled jobs (e.g. revived dead ones) whose bodies the journal holds."""
        self._queue.extend(job_ids)
        self._idle.clear()
        self._wake.set()

    def discard(self, copies: Iterable[StaleCopy]) -> None:
        """Delete these stale copies (e.g. of retried or purged dead jobs) when next
        connected, and later if a runner holds one; best effort."""
        self.stale.add(copies)
        self._wake.set()

    @property
    def stale_copies(self) -> int:
        """Stale copies not deleted yet: asked for, or held by another connection."""
        return len(self.stale)

    @property
    def max_body(self) -> int:
        """Bodies longer than this go through the bulk store (beanstalkd's max-job-size)."""
        return self._max_body

    @max_body.setter
    def max_body(self, limit: int) -> None:
        self._max_body = limit
        self._smallest_limit = min(self._smallest_limit, limit)

    async def tube_stats(self) -> dict[str, dict[str, str | int | float]]:
        """beanstalkd's stats-tube for every tube; empty while beanstalkd is unreachable."""
        client = self._client
        if client is None or client.broken:
            return {}
        try:
            names = await client.list_tubes()
            found = await asyncio.gather(*(client.stats_tube(n) for n in names))
        except (BeanstalkUnavailable, BeanstalkError):
            return {}
        return {n: st for n, st in zip(names, found, strict=True) if st is not None}

    def load(self) -> None:
        """Queue every live job the journal has not seen fed (after replay)."""
        for job_id, entry in self._journal.jobs.items():
            if entry.dead is None and entry.bid == 0:
                self._queue.append(job_id)
        self._wake.set()

    @property
    def pending(self) -> int:
        """Jobs not yet in beanstalkd: queued, taken for the batch being put, or waiting
        for the bulk store."""
        stored_first = self.offloader.pending if self.offloader is not None else 0
        return len(self._queue) + self._in_batch + stored_first

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.broken

    @property
    def verifying(self) -> bool:
        """True until the jobs believed fed have been checked against this beanstalkd."""
        return self._verify

    def _offloaded(self, job: Job, reference: bytes) -> None:
        self.submit([FeedItem.of(job, reference)])

    def forget(self, job_id: str, length: int) -> None:
        """A job is finished (done, or purged): delete its bulk payload if it may have one.

        Every job this process offloaded is covered: it was longer than the limit of the
        moment, so longer than the smallest limit since start, or beanstalkd refused it
        with JOB_TOO_BIG. (Jobs offloaded before a restart of kqs are covered when that
        limit was no larger; `collect` catches the rest.) A delete of a missing payload
        is harmless."""
        if self.offloader is None:
            return
        refused = job_id in self._refused_big
        self._refused_big.discard(job_id)
        if refused or length > self._smallest_limit:
            self.offloader.forget(job_id)

    async def run(self) -> None:
        """Feed until `stop()`; never raises (beanstalkd trouble and bugs are logged and
        retried after a backoff)."""
        offload = asyncio.create_task(self.offloader.run()) if self.offloader else None
        try:
            await self._feed_loop()
        finally:
            if offload is not None and self.offloader is not None:
                self.offloader.stop()
                await offload

    async def _feed_loop(self) -> None:
        """Feed until stopped. beanstalkd trouble and bugs alike end in a new connection
        after a backoff; a bug is logged with its traceback, and its message kept in
        `stats.last_error`."""
        while not self._stopping:
            try:
                await self._feed_step()
            except (BeanstalkUnavailable, BeanstalkError, OSError) as exc:
                if self._client is not None:
                    log.warning("beanstalkd connection lost: %s: %s", type(exc).__name__, exc)
                await self._start_over(exc)
            except Exception as exc:
                log.exception("the feeder failed; it starts over on a new connection")
                await self._start_over(exc)
        await self._disconnect()

    async def _feed_step(self) -> None:
        """One round: connect if needed, verify, delete stale copies, put one batch (or
        wait for work)."""
        client = await self._connected()
        if self._verify:
            await self._verify_fed(client)
        if self.stale.due():
            await self.stale.delete(client)
        if not self._queue and not self.stale.asked:
            self._idle.set()
            if not await self._wait_for_work():
                await self._check_instance(client)
            return
        await self._feed_batch(client)

    async def drain(self, within: float) -> bool:
        """Wait up to `within` seconds for the queue to empty; True if it did."""
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return not self._queue

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- connection ----------------------------------------------------------------

    async def _connected(self) -> FeedConnection:
        if self._client is not None:
            if self._client.broken:
                raise BeanstalkUnavailable("connection to beanstalkd lost")
            return self._client
        client = await self._connect()
        self._client = client
        await self._check_instance(client)
        self._backoff.reset()
        log.info("connected to beanstalkd")
        return client

    async def _check_instance(self, client: FeedConnection) -> None:
        """Notice a restarted beanstalkd (new id or pid): everything fed must be checked."""
        stats = await client.stats()
        limit = stats.get("max-job-size")
        if isinstance(limit, int):
            self.max_body = limit
        instance = (stats.get("id"), stats.get("pid"))
        if instance != self._instance:
            if self._instance is not None:
                log.warning("beanstalkd is a new process; checking every fed job")
                self.stale.new_instance()
            self._instance = instance
            self._verify = True

    async def _start_over(self, exc: Exception) -> None:
        """After an error: keep it for `stats`, drop the connection, back off."""
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        await self._disconnect()
        self.stats.reconnects += 1
        if not self._stopping:
            await self._clock.sleep(self._backoff.next())

    async def _disconnect(self) -> None:
        """Drop the connection; closing it cannot fail."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _wait_for_work(self) -> bool:
        """Wait for submitted work or the heartbeat; True if woken for work."""
        self._wake.clear()
        if self._queue or self.stale.asked or self._stopping:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), self._heartbeat)
        except TimeoutError:
            return False
        return True

    # -- feeding ---------------------------------------------------------------------

    async def _take(self) -> list[FeedItem]:
        """Pop up to one batch, loading bodies for id-only entries, skipping finished jobs."""
        taken: list[FeedItem | str] = []
        while self._queue and len(taken) < self._batch:
            taken.append(self._queue.popleft())
        jobs = self._journal.jobs
        taken = [t for t in taken if not self._large(t)]
        ids = [t for t in taken if isinstance(t, str) and t in jobs and jobs[t].dead is None]
        loaded: dict[str, FeedItem] = {}
        if ids:
            try:  # anything failing here puts the whole batch back: nothing is dropped
                bodies = await self._journal.read_bodies(ids)
                for job_id, body in zip(ids, bodies, strict=True):
                    loaded[job_id] = FeedItem.of(Job.from_body(body), body)
            except BaseException:
                self._queue.extendleft(reversed(taken))
                raise
        items: list[FeedItem] = []
        for t in taken:
            item = loaded.get(t) if isinstance(t, str) else t
            if item is not None and item.job_id in jobs and jobs[item.job_id].dead is None:
                items.append(item)
        return items

    def _large(self, entry: FeedItem | str) -> bool:
        """Route a body too big for beanstalkd to the bulk store (or set it aside)."""
        if isinstance(entry, str):
            known = self._journal.jobs.get(entry)
            if known is None or known.dead is not None:
                return False  # finished or dead: dropped by the caller
            job_id, size = entry, known.length
        else:
            job_id, size = entry.job_id, len(entry.body)
        if size <= self.max_body:
            return False
        self._too_big(job_id, size)
        return True

    def _refused_as_too_big(self, job_id: str, size: int) -> None:
        """beanstalkd answered JOB_TOO_BIG: offload the job all the same, and remember it
        (its payload must be deleted at finish though it may be within `max_body`)."""
        if self.offloader is not None:
            self._refused_big.add(job_id)
        self._too_big(job_id, size)

    def _too_big(self, job_id: str, size: int) -> None:
        if self.offloader is not None:
            self.offloader.submit(job_id)
            return
        if job_id not in self.too_big:
            self.stats.too_big += 1
            log.error(
                "job %s (%d bytes) is larger than beanstalkd's max-job-size and no bulk store"
                " is configured; it stays journaled but is not fed",
                job_id,
                size,
            )
        self.too_big[job_id] = "larger than beanstalkd max-job-size"

    async def _feed_batch(self, client: FeedConnection) -> None:
        self._in_batch = min(len(self._queue), self._batch)
        try:
            await self._put(client, await self._take())
        finally:
            self._in_batch = 0

    async def _put(self, client: FeedConnection, items: list[FeedItem]) -> None:
        """Put one batch; record where each job went; queue again what was refused."""
        if not items:
            return
        now = self._clock.time()
        puts = [
            PutItem(i.tube, i.body, i.prio, max(0, int(i.due - now + 0.999)), i.ttr) for i in items
        ]
        try:
            results = await client.put_batch(puts)
        except BeanstalkUnavailable as exc:
            # The puts answered before the connection broke took effect: keep those,
            # and put again the rest (buried ones too: their copy is deleted later).
            sorted_out = self._sort_out(items, exc.partial)
            self._record_fed(sorted_out.fed)
            self._drop_buried(sorted_out.buried, sorted_out.retry)
            self._queue.extendleft(reversed(sorted_out.retry))
            raise
        except BaseException:
            self._queue.extendleft(reversed(items))
            raise
        sorted_out = self._sort_out(items, results)
        # A kick makes a job ready at once: only for jobs already due. A delayed one's
        # buried copy is deleted and the job put again later, its delay kept.
        due = [(item, bid) for item, bid in sorted_out.buried if item.due <= now]
        delayed = [(item, bid) for item, bid in sorted_out.buried if item.due > now]
        kicked, unkicked = await self._kick(client, due)
        self._record_fed(sorted_out.fed + kicked)
        self._drop_buried(unkicked + delayed, sorted_out.retry)
        retry = sorted_out.retry
        if retry:
            self.stats.put_retries += len(retry)
            self._queue.extendleft(reversed(retry))
            log.warning(
                "beanstalkd refused %d puts (%s); retrying", len(retry), self.stats.last_error
            )
            await self._clock.sleep(self._backoff.next())
        else:
            self._backoff.reset()

    def _sort_out(self, items: list[FeedItem], results: Sequence[PutResult]) -> _PutOutcome:
        """Sort put results (as many as came, in order) into fed, buried and to retry;
        items past the last result are to retry. JOB_TOO_BIG is offloaded here."""
        out = _PutOutcome([], [], [])
        for item, res in zip(items, results, strict=False):
            if res.status == "INSERTED" and res.id is not None:
                out.fed.append((item.job_id, res.id))
            elif res.status == "BURIED" and res.id is not None:
                self.stats.buried_on_put += 1
                out.buried.append((item, res.id))
            elif res.status == "JOB_TOO_BIG":
                self._refused_as_too_big(item.job_id, len(item.body))
            else:  # DRAINING, OUT_OF_MEMORY, EXPECTED_CRLF: beanstalkd cannot take it now
                out.retry.append(item)
                self.stats.last_error = f"put answered {res.status}"
        out.retry += items[len(results) :]
        return out

    def _record_fed(self, fed: list[tuple[str, int]]) -> None:
        self._journal.note_fed_many(fed)
        self.stats.fed += len(fed)

    async def _kick(
        self, client: FeedConnection, buried: list[tuple[FeedItem, int]]
    ) -> tuple[list[tuple[str, int]], list[tuple[FeedItem, int]]]:
        """Kick jobs buried on put back to ready: (kicked as (job id, bid), the others).
        A kick that fails (NOT_FOUND, an error status, a lost connection) is not raised."""
        if not buried:
            return [], []
        answers = await asyncio.gather(
            *(client.kick_job(bid) for _, bid in buried), return_exceptions=True
        )
        kicked: list[tuple[str, int]] = []
        failed: list[tuple[FeedItem, int]] = []
        for (item, bid), answer in zip(buried, answers, strict=True):
            if answer is True:
                kicked.append((item.job_id, bid))
                continue
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer
            failed.append((item, bid))
            why = "NOT_FOUND" if answer is False else f"{type(answer).__name__}: {answer}"
            self.stats.last_error = f"kick-job {bid} after a BURIED put failed: {why}"
            log.warning(
                "%s; deleting it and putting job %s again", self.stats.last_error, item.job_id
            )
        return kicked, failed

    def _drop_buried(self, buried: list[tuple[FeedItem, int]], retry: list[FeedItem]) -> None:
        """Buried copies that stay buried: delete them, and put their jobs again."""
        self.discard(StaleCopy(bid, item.job_id) for item, bid in buried)
        retry += [item for item, _ in buried]

    async def _verify_fed(self, client: FeedConnection) -> None:
        """Peek every job believed fed; queue again those beanstalkd no longer carries."""
        jobs = self._journal.jobs
        fed = [(j, e.bid) for j, e in jobs.items() if e.bid and e.dead is None]
        lost, garbage = 0, []
        for start in range(0, len(fed), self._batch):
            chunk = fed[start : start + self._batch]
            bodies = await client.peek_batch([bid for _, bid in chunk])
            for (job_id, bid), body in zip(chunk, bodies, strict=True):
                if body is None or not carries(body, job_id):
                    self._queue.append(job_id)
                    lost += 1
                    if body is not None and zeroed(body):
                        garbage.append(bid)
        self.stats.verified += len(fed)
        self.stats.refed += lost
        self._verify = False
        if lost:
            log.warning("beanstalkd had lost %d of %d fed jobs; feeding them again", lost, len(fed))
            self._wake.set()
        if garbage:
            log.warning("deleting %d beanstalkd jobs whose bodies are zeroed", len(garbage))
            self.discard(StaleCopy(bid, "") for bid in garbage)
