"""The small stateful pieces a worker keeps: slots, lanes (connections) and leases.

- `Slots`: how many more jobs of one type may start in this process; a sync handler's
  thread that outlived its run keeps one (`hold`) until it returns.
- `Lane`: one beanstalkd connection, the jobs reserved over it not yet settled, and its
  deletes gathered over one event-loop turn and sent in one write (a delete per job
  written on its own costs a system call per job).
- `Leases`: keeps held jobs reserved by touching each about every TTR/2, from one timer
  per worker rather than one per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from kqs.beanstalk import BeanstalkUnavailable

#: Shortest interval between two touches of a held job.
MIN_TOUCH_INTERVAL = 0.25
#: How often the lease timer looks for jobs due a touch.
LEASE_SWEEP = 0.1


class Slots:
    """How many more jobs of one type may start in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.limit - self.used

    def take(self, n: int) -> int:
        """Take up to `n` slots; return how many were taken."""
        k = max(0, min(n, self.limit - self.used))
        self.used += k
        return k

    def give(self, n: int = 1) -> None:
        self.used -= n
        self._freed.set()

    def hold(self) -> Callable[[], None]:
        """Take one slot even when none is free, for a thread still in a handler whose run
        was given up (its job gives its own slot back right after, so the type's total
        stays within `limit` once that is done). Return the give-back; calling it more
        than once gives back one slot only."""
        self.used += 1
        slot = Slot(self)
        return slot.give

    def wake(self) -> None:
        """Wake the waiters without freeing anything (they look around: stop?)."""
        self._freed.set()

    async def wait(self) -> None:
        """Wait until a slot is given back (or `wake`)."""
        self._freed.clear()
        await self._freed.wait()


class Slot:
    """One job's hold on one of its type's slots, given back once."""

    __slots__ = ("_slots",)

    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots

    def give(self) -> None:
        if self._slots is not None:
            self._slots.give(1)
            self._slots = None


class Deleting(Protocol):
    async def delete_batch(self, ids: Sequence[int]) -> list[bool]: ...


C = TypeVar("C", bound=Deleting)


class Lane(Generic[C]):
    """One connection and the jobs reserved over it that are not settled yet."""

    def __init__(self, conn: C) -> None:
        self.conn = conn
        self.inflight = 0
        self.changed = asyncio.Event()
        self._deletes: list[tuple[int, asyncio.Future[bool]]] = []
        self._sending: set[asyncio.Future[list[bool]]] = set()

    def delete(self, bid: int) -> asyncio.Future[bool]:
        """Delete job `bid` with the others deleted in this event-loop turn, in one
        write; the future says True, False (not reserved here) or raises as the
        connection's calls do."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if not self._deletes:
            loop.call_soon(self._send_deletes)
        self._deletes.append((bid, future))
        return future

    def _send_deletes(self) -> None:
        batch, self._deletes = self._deletes, []
        ids = [bid for bid, _ in batch]
        sending: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_task(
            self.conn.delete_batch(ids)
        )
        self._sending.add(sending)  # a reference until done

        def done(sent: asyncio.Future[list[bool]]) -> None:
            self._sending.discard(sent)
            if sent.cancelled():
                error: BaseException | None = BeanstalkUnavailable("delete cancelled")
            else:
                error = sent.exception()
            for i, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(sent.result()[i])

        sending.add_done_callback(done)


@dataclass(slots=True)
class _Held:
    touch: Callable[[], Awaitable[bool]]
    interval: float
    due: float


class Leases:
    """Keeps held jobs reserved: touches each about every max(TTR/2, MIN_TOUCH_INTERVAL)
    seconds from one timer (`run`), until the job is let go."""

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}
        self._keys = itertools.count()
        self._touching: set[asyncio.Future[bool]] = set()

    def hold(self, touch: Callable[[], Awaitable[bool]], ttr: int) -> int:
        """Start keeping a job (`touch` touches it); return the key to `let_go` with."""
        interval = max(MIN_TOUCH_INTERVAL, ttr / 2)
        key = next(self._keys)
        now = asyncio.get_running_loop().time()
        self._held[key] = _Held(touch, interval, now + interval)
        return key

    def let_go(self, key: int) -> None:
        self._held.pop(key, None)

    def __len__(self) -> int:
        return len(self._held)

    async def run(self) -> None:
        """Touch what is due, every LEASE_SWEEP seconds, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LEASE_SWEEP)
            now = loop.time()
            for held in self._held.values():
                if held.due <= now:
                    held.due = now + held.interval
                    touching = asyncio.ensure_future(held.touch())
                    self._touching.add(touching)
                    touching.add_done_callback(self._touching.discard)

    async def close(self) -> None:
        """Wait for touches in flight (they never raise)."""
        for touching in list(self._touching):
            with contextlib.suppress(Exception):
                await touching
