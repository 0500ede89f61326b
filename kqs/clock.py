"""Time, passed in.

Nothing deep inside kqs reads the clock or sleeps directly: it is handed a `Clock`.
Tests pass a `ManualClock` so that delays and backoff are checked without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (job timestamps, ids)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (timeouts, intervals)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (backoff)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to; `sleep` advances it and yields once."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


SYSTEM_CLOCK = SystemClock()
