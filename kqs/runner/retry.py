"""Retry policy and the retry decision: pure functions of numbers, no clock, no I/O.

`RetryPolicy` is a small value that validates itself. `retry_delay` gives the backoff
before the next attempt (integer seconds, beanstalkd's resolution); `decide` turns a run's
outcome and its attempt number into what to do with the job in beanstalkd.

The default policy (25 attempts, exponential from 15 s doubling up to a 2-day cap, +-10 %
jitter) spreads the 24 retries over about 23 days, like Sidekiq's and Faktory's 25 retries
over about three weeks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from kqs.backoff import compute_backoff

BackoffKind = Literal["exponential", "linear", "constant"]
BACKOFF_KINDS: Final[tuple[BackoffKind, ...]] = ("exponential", "linear", "constant")
MAX_ATTEMPTS_LIMIT: Final = 10_000
#: beanstalkd's largest delay (a uint32 of seconds).
MAX_DELAY: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a job of one type is tried and how long to wait between tries.

    Attempt n (1-based) that fails is retried after `delay(n)` seconds while
    n < max_attempts; the failure of attempt `max_attempts` makes the job dead.
    delay(n) before jitter: exponential base * factor**(n-1), linear base * n,
    constant base; always capped at `cap`; then spread by +-`jitter` (a fraction).
    Invalid values raise ValueError naming the field (config.py prefixes the key).
    """

    max_attempts: int = 25
    backoff: BackoffKind = "exponential"
    base: float = 15.0
    factor: float = 2.0
    cap: float = 2 * 86400.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        _check_int(self.max_attempts, "max_attempts", 1, MAX_ATTEMPTS_LIMIT)
        if self.backoff not in BACKOFF_KINDS:
            raise ValueError(
                f"backoff: must be one of {', '.join(BACKOFF_KINDS)}, got {self.backoff!r}"
            )
        _check_number(self.base, "base", 0.0, MAX_DELAY)
        _check_number(self.factor, "factor", 1.0, 1000.0)
        _check_number(self.cap, "cap", 0.0, MAX_DELAY)
        _check_number(self.jitter, "jitter", 0.0, 1.0)
        if self.cap < self.base:
            raise ValueError(f"cap: must be at least base ({self.base}), got {self.cap}")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: must be an integer from {low} to {high}, got {value!r}")


def _check_number(value: object, name: str, low: float, high: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"{name}: must be a number from {low:g} to {high:g}, got {value!r}")


def retry_delay(
    policy: RetryPolicy, attempt: int, *, rand: Callable[[], float] = random.random
) -> int:
    """Seconds to wait after failed attempt `attempt` (1-based) before the next one:
    the policy's curve, capped, jittered, rounded to whole seconds (beanstalkd's unit)."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    if policy.backoff == "exponential":
        seconds = compute_backoff(
            attempt,
            base=policy.base,
            cap=policy.cap,
            factor=policy.factor,
            jitter=policy.jitter,
            rand=rand,
        )
    else:
        # compute_backoff with factor 1 is base, capped and jittered: scale base for linear.
        base = policy.base * attempt if policy.backoff == "linear" else policy.base
        seconds = compute_backoff(
            1,
            base=min(base, policy.cap),
            cap=policy.cap,
            factor=1.0,
            jitter=policy.jitter,
            rand=rand,
        )
    return min(MAX_DELAY, int(seconds + 0.5))


Kind = Literal["done", "retry", "dead"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a reserved job: `delete` (done), `release` after `delay` seconds
    (retry), or `bury` (dead; `exhausted` tells whether attempts ran out)."""

    action: Literal["delete", "release", "bury"]
    delay: int = 0
    exhausted: bool = False


def decide(
    policy: RetryPolicy,
    kind: Kind,
    attempt: int,
    *,
    delay: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Verdict:
    """The verdict for attempt `attempt` of a job that ended as `kind`.

    done -> delete; dead -> bury; retry -> bury (exhausted) when attempt >= max_attempts
    (including the extra run of `exhausted_before_run`), otherwise release after `delay`
    seconds when the handler asked for one (rounded up, clamped to beanstalkd's range),
    else after the policy's `retry_delay`.
    """
    if kind == "done":
        return Verdict("delete")
    if kind == "dead":
        return Verdict("bury")
    if attempt >= policy.max_attempts:
        return Verdict("bury", exhausted=True)
    if delay is not None:
        wait = min(MAX_DELAY, max(0, math.ceil(delay))) if math.isfinite(delay) else MAX_DELAY
        return Verdict("release", delay=wait)
    return Verdict("release", delay=retry_delay(policy, attempt, rand=rand))


def exhausted_before_run(policy: RetryPolicy, attempt: int) -> bool:
    """True when a job reserved for attempt `attempt` is dead without running:
    attempt > max_attempts + 1.

    Reserved for attempt max_attempts + 1, it runs once more: the outcome of run
    max_attempts was lost (its runner crashed, or its done report was never
    acknowledged), and that run may well have succeeded; the extra run settles it, any
    failure of it being final (`decide`). Reserved again after that, the runs ended
    without an outcome twice in a row: dead, so a job that kills its runner cannot loop
    for ever (it ends dead one run later than its attempts)."""
    return attempt > policy.max_attempts + 1
