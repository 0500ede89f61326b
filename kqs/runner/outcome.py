"""What a handler run came to, and the exceptions a Python handler raises to say so.

return normally                 -> done
raise Retry(delay=None, msg)    -> failed, retry (after `delay` s, else the policy's backoff)
raise Fail(msg) / raise Dead    -> failed, do not retry: dead at once
raise anything else             -> failed, retry; "ExcType: message" is kept as the error
                                   (SystemExit, any code, and KeyboardInterrupt too)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OutcomeKind = Literal["done", "retry", "dead"]

#: Longest error text kept with a job (the tail of it, where the cause usually is).
MAX_ERROR_CHARS = 2000


class Retry(Exception):
    """Raise from a handler: this attempt failed, try again (after `delay` seconds if
    given, else after the type's backoff). Counts as an attempt."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class Fail(Exception):
    """Raise from a handler: the job can never succeed; declare it dead now, no retry."""


#: Another name for `Fail`.
Dead = Fail


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one run: `kind`, the error text (failures) and a requested delay."""

    kind: OutcomeKind
    error: str | None = None
    delay: float | None = None

    @staticmethod
    def done() -> Outcome:
        return _DONE

    @staticmethod
    def retry(error: str, delay: float | None = None) -> Outcome:
        return Outcome("retry", clip_error(error), delay)

    @staticmethod
    def dead(error: str) -> Outcome:
        return Outcome("dead", clip_error(error))


_DONE = Outcome("done")


def clip_error(text: str) -> str:
    """The last MAX_ERROR_CHARS characters of `text`, marked when cut."""
    text = text.strip()
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return "..." + text[-(MAX_ERROR_CHARS - 3) :]


def describe(exc: BaseException) -> str:
    """`ExcType: message` (just the type when there is no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def outcome_of_exception(exc: BaseException) -> Outcome:
    """Map what a Python handler raised onto an outcome (see the module docstring)."""
    if isinstance(exc, Retry):
        return Outcome.retry(str(exc) or "retry requested", exc.delay)
    if isinstance(exc, Fail):
        return Outcome.dead(describe(exc))
    return Outcome.retry(describe(exc))


def timed_out(limit: float | None, what: str = "") -> str:
    """The error of a run stopped at its time limit."""
    return f"timed out after {limit:g} s{what}"
