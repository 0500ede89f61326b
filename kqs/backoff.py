"""Exponential backoff with jitter: a pure function and a small stateful helper."""

from __future__ import annotations

import random
from collections.abc import Callable


def compute_backoff(
    attempt: int,
    *,
    base: float,
    cap: float,
    factor: float = 2.0,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry number `attempt` (1-based): base * factor**(attempt-1), capped,
    then spread by +-`jitter` (a fraction) so many waiters do not retry in step."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    delay = min(cap, base * factor ** min(attempt - 1, 64))
    return max(0.0, delay * (1.0 + jitter * (2.0 * rand() - 1.0)))


class Backoff:
    """Counts consecutive failures; `next()` gives the next delay, `reset()` on success."""

    def __init__(self, *, base: float = 0.05, cap: float = 5.0, jitter: float = 0.1) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return compute_backoff(self.failures, base=self.base, cap=self.cap, jitter=self.jitter)

    def reset(self) -> None:
        self.failures = 0
