"""Large payloads: into the bulk store first, then a small reference into beanstalkd.

beanstalkd refuses bodies over its `max-job-size`, and large bodies slow it for every
tube. The feeder hands such jobs here by id; the offloader reads the body from the
journal (so a long store outage holds ids in memory, not payloads), puts it in the bulk
store under the job id (idempotent: a re-fed job is not stored twice), and gives the
feeder a reference body to put instead:

    {"id": "<kqs id>", "type": "<type>", "bulk": <size of the full body>, "ttr": <ttr>}

Runners see `bulk` and fetch the full body from the store. While the store is down,
large jobs wait here (counted in `stats`, with `why` saying why) and small jobs keep
flowing. Payloads of finished jobs are deleted; `collect` removes orphans this node left
(e.g. after a crash between the store write and the finish).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kqs.backoff import Backoff
from kqs.clock import Clock
from kqs.model import Job, dumps_kept, owner_of
from kqs.store import BulkStore, StoreUnavailable

log = logging.getLogger("kqs.offload")

CONCURRENT_PUTS = 4


class BodySource(Protocol):
    @property
    def jobs(self) -> Mapping[str, object]: ...

    async def read_bodies(self, job_ids: Sequence[str]) -> list[bytes]: ...


@dataclass(slots=True)
class OffloadStats:
    stored: int = 0
    deleted: int = 0
    collected: int = 0
    store_available: bool = True
    last_error: str = ""


def reference(job: Job, size: int) -> bytes:
    """The small body fed to beanstalkd in place of a large one (id stays the first key)."""
    return dumps_kept({"id": job.id, "type": job.type, "bulk": size, "ttr": job.ttr})


class Offloader:
    def __init__(
        self,
        store: BulkStore,
        journal: BodySource,
        clock: Clock,
        ready: Callable[[Job, bytes], None],
        *,
        node: str,
        backoff: Backoff | None = None,
    ) -> None:
        """`ready(job, reference_body)` is called once a job's payload is stored."""
        self.store = store
        self._journal = journal
        self._clock = clock
        self._ready = ready
        self._node = node
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._in_flight = 0
        self._deletes: deque[str] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        #: why the last round failed (what keeps large jobs waiting); "" after a good one
        self._stalled = ""
        self.stats = OffloadStats()

    def submit(self, job_id: str) -> None:
        """Store this journaled job's body and then feed its reference."""
        if job_id not in self._queued:
            self._queued.add(job_id)
            self._queue.append(job_id)
            self._wake.set()

    def forget(self, job_id: str) -> None:
        """The job is finished: delete its payload (best effort; `collect` catches misses)."""
        self._deletes.append(job_id)
        self._wake.set()

    @property
    def pending(self) -> int:
        """Jobs whose payload is not stored yet (waiting, or being stored now)."""
        return len(self._queue) + self._in_flight

    @property
    def why(self) -> str:
        """Why `pending` jobs wait: never empty while one does, empty when none does.

        After a failed round it names the failure (the store unavailable, or any other
        error, which is retried too); otherwise their payloads are being stored."""
        if not self.pending:
            return ""
        return self._stalled or "their payloads are being written to the bulk store"

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Store waiting payloads and delete finished ones until `stop()`."""
        while not self._stopping:
            if not self._queue and not self._deletes:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._delete_some()
                await self._store_some()
            except StoreUnavailable as exc:
                self.stats.store_available = False
                self.stats.last_error = str(exc)
                self._stalled = f"bulk store unavailable: {exc}"
                log.warning("bulk store unavailable (%s); large jobs wait", exc)
                await self._clock.sleep(self._backoff.next())
            except Exception as exc:  # a bug must not stop large jobs for good: log, retry
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._stalled = f"storing payloads failed, retrying: {self.stats.last_error}"
                log.exception("bulk store offload failed")
                await self._clock.sleep(self._backoff.next())
            else:
                self.stats.store_available = True
                self._stalled = ""
                self._backoff.reset()

    async def _store_some(self) -> None:
        """Store up to CONCURRENT_PUTS payloads at once; failed ones go back to the front."""
        taken = [self._queue.popleft() for _ in range(min(CONCURRENT_PUTS, len(self._queue)))]
        self._in_flight = len(taken)
        try:
            await self._store(taken)
        finally:
            self._in_flight = 0

    async def _store(self, taken: list[str]) -> None:
        live = [i for i in taken if i in self._journal.jobs]
        failed: list[str] = []
        failure: BaseException | None = None
        try:
            bodies = await self._journal.read_bodies(live) if live else []
            jobs = [Job.from_body(b) for b in bodies]
            results = await asyncio.gather(
                *(self.store.put(j.id, b) for j, b in zip(jobs, bodies, strict=True)),
                return_exceptions=True,
            )
        except BaseException:
            self._queue.extendleft(reversed(taken))
            raise
        for job, body, result in zip(jobs, bodies, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(job.id)
                failure = failure or result
            else:
                self.stats.stored += 1
                self._ready(job, reference(job, len(body)))
        self._queue.extendleft(reversed(failed))
        self._queued.difference_update(set(taken) - set(failed))
        if failure is not None:
            raise failure

    async def _delete_some(self) -> None:
        """Delete the payloads of finished jobs, oldest first. StoreUnavailable leaves the
        rest for the next round; any other failure drops that one delete (logged): the
        payload is then an orphan for `collect`, and it cannot hold up storing."""
        while self._deletes:
            key = self._deletes[0]
            try:
                await self.store.delete(key)
            except StoreUnavailable:
                raise
            except Exception:
                log.exception("bulk store: cannot delete %s; orphan collection will", key)
            else:
                self.stats.deleted += 1
            self._deletes.popleft()

    async def collect(self, window: float) -> int:
        """Delete this node's payloads older than `window` s whose jobs are finished."""
        old = await self.store.list_older_than(window, self._clock.time())
        orphans = [k for k in old if owner_of(k) == self._node and k not in self._journal.jobs]
        for key in orphans:
            await self.store.delete(key)
        self.stats.collected += len(orphans)
        if orphans:
            log.info("bulk store: collected %d orphaned payloads", len(orphans))
        return len(orphans)
