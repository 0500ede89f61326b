"""Handlers: run one job, map whatever happens onto an `Outcome`. No beanstalkd here.

Two kinds, both behind `Handler.run(job, body, time_limit) -> Outcome`, which never raises
except `asyncio.CancelledError` (the runner aborting the run at shutdown):

- `PythonHandler`: a callable `module:function` taking a `JobContext`. An async one is
  awaited on the event loop; a sync one runs in the runner's thread pool. Returning means
  done; exceptions map as described in kqs.runner.outcome. At `timeout` an async handler
  is cancelled; a sync one cannot be stopped: the run counts as failed (retry) and its
  thread finishes in the background, its result ignored.
- `CommandHandler`: an external program. stdin carries the job body JSON plus "attempt";
  the environment carries KQS_JOB_ID, KQS_JOB_TYPE and KQS_ATTEMPT; stdout is inherited.
  Exit 0 = done, `dead_exit_code` (default 100) = dead, anything else = retry. At
  `timeout` (default: the job's TTR) its process group is killed (retry). The last
  MAX_ERROR_CHARS of stderr are kept as the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import shutil
import signal
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson

from kqs.errors import ConfigError
from kqs.runner.config import PythonTarget, TypeConfig
from kqs.runner.outcome import MAX_ERROR_CHARS, Outcome, describe, outcome_of_exception


@dataclass(frozen=True, slots=True)
class JobContext:
    """The job as a Python handler sees it.

    `attempt` is 1 on the first run (beanstalkd's reserve count, so it survives runner
    crashes); `ttr` is the job's time-to-run in seconds. The runner keeps the job reserved
    while the handler runs (it touches it about every ttr/2); `await job.touch()` does so
    at once and returns False if the reservation is lost (the job may run elsewhere).
    """

    id: str
    type: str
    data: Any
    attempt: int
    ttr: int
    touch: Callable[[], Awaitable[bool]]
    max_attempts: int = 1
    prio: int = 0


class Handler(Protocol):
    async def run(self, job: JobContext, body: dict[str, Any], time_limit: float | None) -> Outcome:
        """Run `job` once; return its outcome. Raises only asyncio.CancelledError."""
        ...


class ThreadPool:
    """The thread pool for sync handlers, counting threads busy in a handler (a handler
    that outlived its timeout or the shutdown grace keeps its thread until it returns)."""

    def __init__(self, size: int) -> None:
        self.executor = ThreadPoolExecutor(max(1, size), thread_name_prefix="kqs-handler")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def call(self, func: Callable[[JobContext], Any], job: JobContext) -> Any:
        """Run in a pool thread: call `func(job)`, counted as busy."""
        with self._lock:
            self._busy += 1
        try:
            return func(job)
        finally:
            with self._lock:
                self._busy -= 1

    def shutdown(self) -> None:
        """Stop taking work; running handlers are not waited for."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _timed_out(limit: float | None, what: str) -> str:
    return f"timed out after {limit:g} s{what}"


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
            except (Exception, SystemExit) as exc:
                return outcome_of_exception(exc)
            return Outcome.done()
        deadline = asyncio.timeout(time_limit)
        try:
            async with deadline:
                if self.is_async:
                    result = await self.func(job)
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(
                        self.threads.executor, self.threads.call, self.func, job
                    )
                    if inspect.isawaitable(result):
                        result = await result
        except TimeoutError as exc:
            if deadline.expired():
                return Outcome.retry(_timed_out(time_limit, ""))
            return outcome_of_exception(exc)
        except (Exception, SystemExit) as exc:
            return outcome_of_exception(exc)
        return Outcome.done()


# A program gone before its input was written: the pipe is broken or reset, or (on
# uvloop) its transport is already closed, which uvloop reports as RuntimeError.
_STDIN_GONE = (BrokenPipeError, ConnectionResetError, RuntimeError)


async def _write_stdin(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    """Give the program its input; a program that exits without reading it is not an error."""
    if stream is None:
        return
    with contextlib.suppress(*_STDIN_GONE):
        if stream.is_closing():
            return
        stream.write(data)
        await stream.drain()
    with contextlib.suppress(*_STDIN_GONE):
        stream.close()
        await stream.wait_closed()


async def _read_tail(stream: asyncio.StreamReader | None, keep: int) -> bytes:
    """Read `stream` to its end, keeping only its last `keep` bytes."""
    if stream is None:
        return b""
    tail = bytearray()
    while chunk := await stream.read(65536):
        tail += chunk
        if len(tail) > keep:
            del tail[:-keep]
    return bytes(tail)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the program and everything it started (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


class CommandHandler:
    """An external command; see the module docstring."""

    def __init__(self, argv: tuple[str, ...], dead_exit_code: int) -> None:
        self.argv = argv
        self.dead_exit_code = dead_exit_code

    async def run(self, job: JobContext, body: dict[str, Any], time_limit: float | None) -> Outcome:
        """Run the command once with the job on stdin, bounded by `time_limit` (None: TTR)."""
        limit = float(job.ttr) if time_limit is None else time_limit
        env = {
            **os.environ,
            "KQS_JOB_ID": job.id,
            "KQS_JOB_TYPE": job.type,
            "KQS_ATTEMPT": str(job.attempt),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return Outcome.retry(f"cannot start {self.argv[0]}: {describe(exc)}")
        stdin = orjson.dumps({**body, "attempt": job.attempt})
        reader = asyncio.ensure_future(_read_tail(proc.stderr, MAX_ERROR_CHARS))
        timed_out = False
        try:
            try:
                async with asyncio.timeout(limit):
                    await _write_stdin(proc.stdin, stdin)
                    await proc.wait()
            except TimeoutError:
                timed_out = True
                _kill_group(proc)
                await proc.wait()
        except asyncio.CancelledError:
            _kill_group(proc)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
            raise
        try:
            async with asyncio.timeout(1.0):  # a child of the program may hold stderr open
                tail = await reader
        except TimeoutError:
            tail = b""
        err = tail.decode("utf-8", "replace").strip()
        rc = proc.returncode
        if timed_out:
            return Outcome.retry(_timed_out(limit, " (killed)") + (f": {err}" if err else ""))
        if rc == 0:
            return Outcome.done()
        what = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        text = f"{what}: {err}" if err else what
        if rc == self.dead_exit_code:
            return Outcome.dead(text)
        return Outcome.retry(text)


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


def make_handler(config: TypeConfig, threads: ThreadPool) -> Handler:
    """The handler for one job type; ConfigError naming the key if it cannot be made."""
    spec = config.handler
    if isinstance(spec, PythonTarget):
        return PythonHandler(import_target(spec.target, f"types.{config.name}.handler"), threads)
    program = spec.argv[0]
    if shutil.which(program) is None:
        raise ConfigError(
            f"types.{config.name}.command: {program!r} is not an executable program"
            " (not found, or not executable)"
        )
    return CommandHandler(spec.argv, spec.dead_exit_code)
