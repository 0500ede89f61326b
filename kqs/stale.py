"""Stale copies: beanstalkd jobs carrying a kqs job that kqs no longer feeds there (the
old copy of a retried or purged dead job, a buried put whose kick failed, a husk with a
zeroed body). No journal here: the feeder hands them in and runs `delete` on its
connection.

Contract:
- A copy is deleted only after a `peek` shows its beanstalkd id still carries it (an id
  of a restarted beanstalkd may name another job now) and the journal does not name it
  as its job's live copy.
- A copy another connection has reserved cannot be deleted (beanstalkd answers NOT_FOUND
  while `stats-job` still finds it): it is held and tried again every RETRY_EVERY s,
  until it is gone, for RETRY_FOR s, at most RETRY_MAX of them.
- On a new beanstalkd process (`new_instance`), held copies are asked for again, so the
  `peek` check runs on that process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from kqs.clock import Clock

log = logging.getLogger("kqs.feeder")

RETRY_EVERY = 1.0
"""Seconds between attempts at deleting stale copies another connection holds."""
RETRY_FOR = 3600.0
"""Seconds after which such a copy is given up on (its TTR has long passed by then)."""
RETRY_MAX = 10_000
"""At most this many such copies are held; beyond it the oldest is given up on."""


class StaleCopy(NamedTuple):
    """A beanstalkd job to delete: `bid`, if it still carries a copy of kqs job `job_id`
    that the journal does not name as the job's live copy; with `job_id` "", if its
    body is zeroed (a husk restored from a torn binlog record)."""

    bid: int
    job_id: str


def carries(body: bytes, job_id: str) -> bool:
    """True if a beanstalkd job body is the body of kqs job `job_id` (id is the first key)."""
    return body.startswith(b'{"id":"' + job_id.encode() + b'"')


def zeroed(body: bytes) -> bool:
    """True for a body of NUL bytes only: what beanstalkd restores from a binlog record
    whose header reached the file and whose body did not (it was killed in between).
    Such a job is nobody's job, so verification deletes it."""
    return not body.strip(b"\0")


class LiveCopy(Protocol):
    @property
    def bid(self) -> int: ...


class StaleClient(Protocol):
    """What deleting stale copies needs of a beanstalkd connection."""

    async def peek_batch(self, ids: Sequence[int]) -> list[bytes | None]: ...

    async def delete(self, job_id: int) -> bool: ...

    async def stats_job(self, job_id: int) -> dict[str, str | int | float] | None: ...


class StaleCopies:
    """The copies asked to be deleted, and those held by another connection."""

    def __init__(self, jobs: Callable[[], Mapping[str, LiveCopy]], clock: Clock) -> None:
        """`jobs()`: the unfinished jobs by id, with the beanstalkd id of their live copy."""
        self._jobs = jobs
        self._clock = clock
        self.asked: list[StaleCopy] = []
        # held copies, with when that was first seen (monotonic)
        self._held: dict[StaleCopy, float] = {}
        self._next_retry = 0.0

    def add(self, copies: Iterable[StaleCopy]) -> None:
        self.asked.extend(copies)

    def __len__(self) -> int:
        """Copies not deleted yet: asked for, or held."""
        return len(self.asked) + len(self._held)

    def due(self) -> bool:
        """True if `delete` has something to do now."""
        return bool(self.asked) or self._held_due()

    def _held_due(self) -> bool:
        """True if the held copies are due for another try."""
        return bool(self._held) and self._clock.monotonic() >= self._next_retry

    def new_instance(self) -> None:
        """beanstalkd is a new process: held ids named jobs of the old one; check anew."""
        self.asked.extend(self._held)
        self._held.clear()

    async def delete(self, client: StaleClient) -> None:
        """Delete the copies asked for that are still stale, and try again the held ones
        when due; hold those another connection has reserved. If the connection fails,
        the copies asked for are asked for again."""
        asked, self.asked = self.asked, []
        due = list(self._held) if self._held_due() else []
        try:
            asked = await self._still_stale(client, asked)
            undeletable = await self._delete(client, asked + due)
        except BaseException:
            self.asked[:0] = asked
            raise
        self._settle(asked, due, set(undeletable))

    async def _still_stale(self, client: StaleClient, copies: list[StaleCopy]) -> list[StaleCopy]:
        """The copies whose beanstalkd id still carries what was to be deleted."""
        if not copies:
            return []
        bodies = await client.peek_batch([c.bid for c in copies])
        jobs = self._jobs()
        stale: list[StaleCopy] = []
        for copy, body in zip(copies, bodies, strict=True):
            if body is None:
                continue
            if copy.job_id == "":
                matches = zeroed(body)
            else:
                live = jobs.get(copy.job_id)
                matches = carries(body, copy.job_id) and (live is None or live.bid != copy.bid)
            if matches:
                stale.append(copy)
        return stale

    @staticmethod
    async def _delete(client: StaleClient, copies: list[StaleCopy]) -> list[StaleCopy]:
        """Delete the copies; return those beanstalkd still has (reserved by another
        connection, so NOT_FOUND to our delete)."""
        if not copies:
            return []
        deleted = await asyncio.gather(*(client.delete(c.bid) for c in copies))
        missed = [c for c, ok in zip(copies, deleted, strict=True) if not ok]
        found = await asyncio.gather(*(client.stats_job(c.bid) for c in missed))
        return [c for c, info in zip(missed, found, strict=True) if info is not None]

    def _settle(
        self, asked: list[StaleCopy], due: list[StaleCopy], undeletable: set[StaleCopy]
    ) -> None:
        """Update the held copies after a round of deletes: drop those gone, give up on
        those held too long (or too many), hold the new ones."""
        now = self._clock.monotonic()
        for copy in due:
            if copy not in undeletable:
                del self._held[copy]
            elif now - self._held[copy] > RETRY_FOR:
                del self._held[copy]
                log.warning("giving up deleting stale beanstalkd job %d: still reserved", copy.bid)
        if due:
            self._next_retry = now + RETRY_EVERY
        for copy in asked:
            if copy in undeletable and copy not in self._held:
                if not self._held:
                    self._next_retry = now + RETRY_EVERY
                self._held[copy] = now
        while len(self._held) > RETRY_MAX:
            oldest = next(iter(self._held))
            del self._held[oldest]
            log.warning("giving up deleting stale beanstalkd job %d: too many held", oldest.bid)
