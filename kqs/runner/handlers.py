"""Handlers: run one job, map whatever happens onto an `Outcome`. No beanstalkd here.

Two kinds, both behind `Handler.run(job, body, time_limit) -> Outcome`, which never raises
except `asyncio.CancelledError` (the runner aborting the run at shutdown):

- `PythonHandler`: a callable `module:function` taking a `JobContext`. An async one is
  awaited on the event loop; a sync one runs in its type's `ThreadPool`. Returning means
  done; exceptions (SystemExit and KeyboardInterrupt too) map as described in
  kqs.runner.outcome. At `timeout` an async handler is cancelled; a sync one cannot be
  stopped: the run counts as failed (retry), and its thread, finishing in the background
  (its result ignored), keeps one of its type's slots until it returns.
- `CommandHandler` (kqs.runner.command): an external program, the job on its stdin.

`make_handler` makes the one a type's configuration names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import logging
import shutil
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from kqs.errors import ConfigError
from kqs.runner.command import CommandHandler
from kqs.runner.config import PythonTarget, TypeConfig
from kqs.runner.outcome import Outcome, describe, outcome_of_exception, timed_out

log = logging.getLogger("kqs.runner.handlers")

#: What a Python handler may raise that counts as a failed run (retry, unless it says
#: otherwise): everything but the runner's own cancellation.
HANDLER_FAILURES: Final = (Exception, SystemExit, KeyboardInterrupt)
#: The longest `JobContext.touch_sync` waits, by default, for the touch to be done.
TOUCH_SYNC_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class JobContext:
    """The job as a Python handler sees it.

    `attempt` is 1 on the first run (beanstalkd's reserve count, so it survives runner
    crashes); `ttr` is the job's time-to-run in seconds. The runner keeps the job reserved
    while the handler runs (it touches it about every ttr/2); `await job.touch()` does so
    at once and returns False if the reservation is lost (the job may run elsewhere). A
    sync handler, in a thread, calls `job.touch_sync()` instead. `loop` is the runner's
    event loop (where `touch` runs).
    """

    id: str
    type: str
    data: Any
    attempt: int
    ttr: int
    touch: Callable[[], Awaitable[bool]]
    max_attempts: int = 1
    prio: int = 0
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False, compare=False)

    def touch_sync(self, timeout: float = TOUCH_SYNC_SECONDS) -> bool:
        """`touch` for a sync handler: run it on the runner's event loop and wait for it,
        at most `timeout` seconds. True if the job's TTR restarted; False if the job is no
        longer reserved by this runner, or the touch was not done in time (or the runner's
        loop is gone). RuntimeError if called on the loop's own thread (it would wait for
        itself: await `touch()` there) or if the context has no loop."""
        loop = self.loop
        if loop is None:
            raise RuntimeError("this job has no event loop to touch it on")
        if _running_loop() is loop:
            raise RuntimeError("touch_sync() on the event loop would block it: await touch()")

        async def touching() -> bool:
            return await self.touch()

        coro = touching()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            return False
        try:
            return future.result(timeout)
        except (TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            return False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Handler(Protocol):
    async def run(self, job: JobContext, body: dict[str, Any], time_limit: float | None) -> Outcome:
        """Run `job` once; return its outcome. Raises only asyncio.CancelledError."""
        ...


#: Takes one of a type's slots for a thread still in a handler; returns the give-back.
Hold = Callable[[], Callable[[], None]]


class ThreadPool:
    """The threads of one job type's sync handler: as many as the type's concurrency.

    A run given up on (timed out, or cancelled at shutdown) whose handler is still in its
    thread keeps that thread; `hold` (the type's `Slots.hold`) then takes one of the
    type's slots until the thread returns. So every job the type starts finds a thread at
    once, and a hung handler lowers only its own type's concurrency. `busy` counts the
    threads in a handler, `outliving` those whose run was given up on."""

    def __init__(self, size: int, *, name: str = "sync", hold: Hold | None = None) -> None:
        self.name = name
        self.executor = ThreadPoolExecutor(max(1, size), thread_name_prefix=f"kqs-{name}")
        self.outliving = 0  # changed on the event loop only
        self._hold = hold
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def submit(self, func: Callable[[JobContext], Any], job: JobContext) -> Future[Any]:
        """Start `func(job)` in a pool thread."""
        return self.executor.submit(self._call, func, job)

    def _call(self, func: Callable[[JobContext], Any], job: JobContext) -> Any:
        """In a pool thread: call `func(job)`, counted as busy."""
        with self._lock:
            self._busy += 1
        try:
            return func(job)
        finally:
            with self._lock:
                self._busy -= 1

    def given_up(self, future: Future[Any], why: str) -> None:
        """The run in `future` is given up on (`why`): a run not started yet is cancelled;
        a handler still in its thread holds one of the type's slots until it returns (the
        give-back is scheduled on this event loop; dropped if the loop is closed by then)."""
        if future.cancel() or future.done():
            return
        give_back = self._hold() if self._hold is not None else _nothing
        self.outliving += 1
        log.warning(
            "%s: a sync handler %s but cannot be stopped; its thread keeps one of the"
            " type's slots until it returns (%d such thread(s) now)",
            self.name,
            why,
            self.outliving,
        )
        loop = asyncio.get_running_loop()

        def returned(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._returned, give_back)

        future.add_done_callback(returned)

    def _returned(self, give_back: Callable[[], None]) -> None:
        """On the loop: a handler given up on has returned; its slot is free again."""
        self.outliving -= 1
        give_back()
        log.info("%s: a sync handler given up on has returned; its slot is free again", self.name)

    def shutdown(self) -> None:
        """Stop taking work; running handlers are not waited for."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _nothing() -> None:
    """A give-back with nothing to give back."""


class PythonHandler:
    """A Python callable; see the module docstring."""

    def __init__(self, func: Callable[[JobContext], Any], threads: ThreadPool) -> None:
        self.func = func
        self.threads = threads
        # a coroutine function, or an object whose class has an async __call__
        self.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            type(func).__call__
        )

    async def run(self, job: JobContext, body: dict[str, Any], time_limit: float | None) -> Outcome:
        """Call the handler once, bounded by `time_limit` seconds (None: no bound)."""
        if time_limit is None and self.is_async:  # the common case, kept lean
            try:
                await self.func(job)
            except HANDLER_FAILURES as exc:
                return outcome_of_exception(exc)
            return Outcome.done()
        deadline = asyncio.timeout(time_limit)
        future: Future[Any] | None = None
        try:
            async with deadline:
                if self.is_async:
                    result = await self.func(job)
                else:
                    future = self.threads.submit(self.func, job)
                    result = await asyncio.wrap_future(future)
                    if inspect.isawaitable(result):
                        result = await result
        except TimeoutError as exc:
            if deadline.expired():
                self._given_up(future, f"ran past its timeout ({time_limit:g} s)")
                return Outcome.retry(timed_out(time_limit))
            return outcome_of_exception(exc)
        except asyncio.CancelledError:
            self._given_up(future, "was cancelled (the runner is stopping)")
            raise
        except HANDLER_FAILURES as exc:
            return outcome_of_exception(exc)
        return Outcome.done()

    def _given_up(self, future: Future[Any] | None, why: str) -> None:
        """A sync run in `future` (None: an async run) is given up on: see ThreadPool."""
        if future is not None:
            self.threads.given_up(future, why)


def import_target(target: str, key: str) -> Callable[[JobContext], Any]:
    """Import `module:function` (function may be dotted); ConfigError naming `key` if not."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r}: {describe(exc)}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{key}: {module_name!r} has no {attr_path!r}") from None
    if not callable(obj):
        raise ConfigError(f"{key}: {target!r} is not callable")
    return cast(Callable[[JobContext], Any], obj)


def make_handler(config: TypeConfig, threads: ThreadPool | None) -> Handler:
    """The handler for one job type; ConfigError naming the key if it cannot be made.
    A Python handler runs its sync calls in `threads` (the type's own pool; required)."""
    spec = config.handler
    if isinstance(spec, PythonTarget):
        if threads is None:
            raise ValueError(f"types.{config.name}: a Python handler needs a thread pool")
        return PythonHandler(import_target(spec.target, f"types.{config.name}.handler"), threads)
    program = spec.argv[0]
    if shutil.which(program) is None:
        raise ConfigError(
            f"types.{config.name}.command: {program!r} is not an executable program"
            " (not found, or not executable)"
        )
    return CommandHandler(spec.argv, spec.dead_exit_code)
