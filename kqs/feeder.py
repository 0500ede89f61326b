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
  grow its queue) is kicked back to ready; DRAINING and OUT_OF_MEMORY back off and retry;
  JOB_TOO_BIG goes the large-body way above.
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


def carries(body: bytes, job_id: str) -> bool:
    """True if a beanstalkd job body is the body of kqs job `job_id` (id is the first key)."""
    return body.startswith(b'{"id":"' + job_id.encode() + b'"')


def zeroed(body: bytes) -> bool:
    """True for a body of NUL bytes only: what beanstalkd restores from a binlog record
    whose header reached the file and whose body did not (it was killed in between).
    Such a job is nobody's job, so verification deletes it."""
    return not body.strip(b"\0")


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
        self._discard: list[int] = []
        self.too_big: dict[str, str] = {}
        self.stats = FeederStats()
        #: bodies longer than this go through the bulk store (beanstalkd's max-job-size)
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

    def discard(self, bids: Iterable[int]) -> None:
        """Delete these beanstalkd jobs (stale copies, e.g. of retried or purged dead jobs)
        when next connected; best effort."""
        self._discard.extend(bids)
        self._wake.set()

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
        """A job is finished: drop its bulk payload if it had one."""
        if self.offloader is not None and length > self.max_body:
            self.offloader.forget(job_id)

    async def run(self) -> None:
        """Feed until `stop()`; never raises for beanstalkd trouble."""
        offload = asyncio.create_task(self.offloader.run()) if self.offloader else None
        try:
            await self._feed_loop()
        finally:
            if offload is not None and self.offloader is not None:
                self.offloader.stop()
                await offload

    async def _feed_loop(self) -> None:
        while not self._stopping:
            try:
                client = await self._connected()
                if client is None:
                    continue
                if self._verify:
                    await self._verify_fed(client)
                if self._discard:
                    await self._delete_discarded(client)
                if not self._queue and not self._discard:
                    self._idle.set()
                    if not await self._wait_for_work():
                        await self._check_instance(client)
                    continue
                await self._feed_batch(client)
            except (BeanstalkUnavailable, BeanstalkError, OSError) as exc:
                await self._lost(exc)
        await self._disconnect()

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

    async def _connected(self) -> FeedConnection | None:
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
            self._instance = instance
            self._verify = True

    async def _lost(self, exc: Exception) -> None:
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        if self._client is not None:
            log.warning("beanstalkd connection lost: %s", self.stats.last_error)
        await self._disconnect()
        self.stats.reconnects += 1
        if not self._stopping:
            await self._clock.sleep(self._backoff.next())

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(BeanstalkUnavailable, OSError):
                await client.close()

    async def _wait_for_work(self) -> bool:
        """Wait for submitted work or the heartbeat; True if woken for work."""
        self._wake.clear()
        if self._queue or self._discard or self._stopping:
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
            try:
                bodies = await self._journal.read_bodies(ids)
            except BaseException:
                self._queue.extendleft(reversed(taken))
                raise
            for job_id, body in zip(ids, bodies, strict=True):
                loaded[job_id] = FeedItem.of(Job.from_body(body), body)
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
        if not items:
            return
        now = self._clock.time()
        puts = [
            PutItem(i.tube, i.body, i.prio, max(0, int(i.due - now + 0.999)), i.ttr) for i in items
        ]
        try:
            results = await client.put_batch(puts)
        except BeanstalkUnavailable as exc:
            # The puts answered INSERTED before the connection broke took effect: keep
            # their bids, and put again only from the first other one on.
            done: list[tuple[str, int]] = []
            for item, res in zip(items, exc.partial, strict=False):
                if res.status != "INSERTED" or res.id is None:
                    break
                done.append((item.job_id, res.id))
            self._journal.note_fed_many(done)
            self.stats.fed += len(done)
            self._queue.extendleft(reversed(items[len(done) :]))
            raise
        except BaseException:
            self._queue.extendleft(reversed(items))
            raise
        retry: list[FeedItem] = []
        kicks: list[int] = []
        fed: list[tuple[str, int]] = []
        for item, res in zip(items, results, strict=True):
            if res.status in ("INSERTED", "BURIED") and res.id is not None:
                fed.append((item.job_id, res.id))
                if res.status == "BURIED":
                    self.stats.buried_on_put += 1
                    kicks.append(res.id)
            elif res.status == "JOB_TOO_BIG":
                self._too_big(item.job_id, len(item.body))
            else:  # DRAINING, OUT_OF_MEMORY, EXPECTED_CRLF: beanstalkd cannot take it now
                retry.append(item)
                self.stats.last_error = f"put answered {res.status}"
        self._journal.note_fed_many(fed)
        self.stats.fed += len(fed)
        for bid in kicks:
            await client.kick_job(bid)
        if retry:
            self.stats.put_retries += len(retry)
            self._queue.extendleft(reversed(retry))
            log.warning(
                "beanstalkd refused %d puts (%s); retrying", len(retry), self.stats.last_error
            )
            await self._clock.sleep(self._backoff.next())
        else:
            self._backoff.reset()

    async def _delete_discarded(self, client: FeedConnection) -> None:
        bids, self._discard = self._discard, []
        await asyncio.gather(*(client.delete(b) for b in bids))

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
            self.discard(garbage)
