"""Reports of finished jobs (`finish`) to one kqs server: batched, retried, never dropped
while the server is unreachable.

Contract: every item given to `add` is sent until the server acknowledges it: its result
is an outcome, or a `not_found` error (already finished: the job is retired either way).
An `invalid_params` error for an item cannot get better by resending; the item is dropped
and logged. Any other item error (`journal_failed`, `shutting_down`, ...) and every failure
of the whole call (unreachable, no reply, an error reply) keeps the items, and the whole
pending set is sent again after a backoff. Items wait in memory only: a runner that dies
with reports pending leaves those jobs unfinished in the journal, and kqs feeds them
again when it next checks beanstalkd (at-least-once: they may run again, never get lost).

At most one `finish` call is in flight; it carries up to `max_batch` items, gathered for
`linger` seconds after the first one arrives. A server that closes the connection with
`line_too_long` (its `max_line_bytes` is smaller than the batch) gets batches half as big.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from kqs.backoff import Backoff
from kqs.client import RemoteError
from kqs.clock import Clock
from kqs.runner.kqsrpc import KqsUnavailable

log = logging.getLogger("kqs.runner.reporter")

#: Item error codes that mean "acknowledged".
ACK_CODES = frozenset({"not_found"})
#: Item error codes that resending cannot fix: dropped (and logged).
DROP_CODES = frozenset({"invalid_params"})


@dataclass(frozen=True, slots=True)
class FinishItem:
    """One `finish` array item; `on_settled` runs once the server has acknowledged it
    (or refused it for good)."""

    id: str
    outcome: Literal["done", "dead"]
    type: str
    error: str | None = None
    attempts: int | None = None
    on_settled: Callable[[], None] | None = None

    def wire(self) -> dict[str, Any]:
        item: dict[str, Any] = {"id": self.id, "outcome": self.outcome, "type": self.type}
        if self.error is not None:
            item["error"] = self.error
        if self.attempts is not None:
            item["attempts"] = self.attempts
        return item


#: Sends one `finish` call with an array of items; returns the call's result.
Send = Callable[[list[dict[str, Any]]], Awaitable[Any]]


@dataclass(slots=True)
class ReporterStats:
    calls: int = 0
    acked: int = 0
    dropped: int = 0
    failures: int = 0
    last_error: str = ""


class Reporter:
    """Batches `finish` reports for one server; see the module docstring."""

    def __init__(
        self,
        name: str,
        send: Send,
        clock: Clock,
        *,
        max_batch: int = 500,
        linger: float = 0.02,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self._send = send
        self._clock = clock
        self.max_batch = max_batch
        self.linger = linger
        self._backoff = backoff or Backoff(base=0.1, cap=10.0)
        self._pending: deque[FinishItem] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.stats = ReporterStats()

    @property
    def pending(self) -> int:
        """Items not yet acknowledged (including those in the call in flight)."""
        return len(self._pending)

    def add(self, item: FinishItem) -> None:
        """Queue one report; it is sent with the next batch."""
        self._pending.append(item)
        self._drained.clear()
        self._wake.set()

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a deadline
        """Wait until nothing is pending, at most `timeout` seconds; True if drained."""
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Send batches until cancelled."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._pending) < self.max_batch and self.linger > 0:
                await self._clock.sleep(self.linger)
            if not await self.send_once():
                await self._clock.sleep(self._backoff.next())

    async def send_once(self) -> bool:
        """Send the first `max_batch` pending items in one call and settle each by its
        result; False (items kept) if the call as a whole failed."""
        batch = [self._pending[i] for i in range(min(self.max_batch, len(self._pending)))]
        if not batch:
            return True
        self.stats.calls += 1
        try:
            result = await self._send([item.wire() for item in batch])
            results = result.get("results") if isinstance(result, dict) else None
            if not isinstance(results, list) or len(results) != len(batch):
                raise ValueError(f"finish result does not match the {len(batch)} items sent")
        except (KqsUnavailable, RemoteError, OSError, ValueError) as exc:
            self.stats.failures += 1
            self.stats.last_error = str(exc)
            if isinstance(exc, KqsUnavailable) and exc.code == "line_too_long":
                # the server's max_line_bytes is smaller than this batch: send smaller ones
                self.max_batch = max(1, len(batch) // 2)
            log.warning(
                "kqs %s: cannot report %d finished job(s), will retry: %s",
                self.name,
                len(self._pending),
                exc,
            )
            return False
        keep = [
            item for item, res in zip(batch, results, strict=True) if not self._settle(item, res)
        ]
        for _ in batch:
            self._pending.popleft()
        self._pending.extendleft(reversed(keep))
        if not self._pending:
            self._drained.set()
        if keep:
            return False
        self._backoff.reset()
        return True

    def _settle(self, item: FinishItem, result: Any) -> bool:
        """Account for one item's result; True if it is settled (acked or dropped)."""
        error = result.get("error") if isinstance(result, dict) else None
        if error is None and isinstance(result, dict) and "outcome" in result:
            self._acked(item)
            return True
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else repr(result)
        if code in ACK_CODES:
            self._acked(item)
            return True
        if code in DROP_CODES:
            self.stats.dropped += 1
            log.error("kqs %s refused the report for %s: %s %s", self.name, item.id, code, message)
            self._settled(item)
            return True
        self.stats.last_error = f"{code}: {message}"
        log.warning(
            "kqs %s: report for %s failed (%s: %s), will retry", self.name, item.id, code, message
        )
        return False

    def _acked(self, item: FinishItem) -> None:
        self.stats.acked += 1
        self._settled(item)

    def _settled(self, item: FinishItem) -> None:
        if item.on_settled is not None:
            try:
                item.on_settled()
            except Exception:
                log.exception("after the report for %s", item.id)
