"""The command handler: an external program runs one job. No beanstalkd here.

stdin carries the job body JSON plus "attempt"; the environment carries KQS_JOB_ID,
KQS_JOB_TYPE and KQS_ATTEMPT; stdout is inherited. Exit 0 = done, `dead_exit_code`
(default 100) = dead, anything else = retry, after the delay a `kqs-retry-after:
<seconds>` line on stderr asks for (the last one wins). At `timeout` (default: the job's
TTR) its process group is killed (retry). The last MAX_ERROR_CHARS bytes of stderr,
without the retry-after lines, are kept as the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from typing import TYPE_CHECKING, Any, Final

import orjson

from kqs.runner.outcome import MAX_ERROR_CHARS, Outcome, describe, timed_out

if TYPE_CHECKING:
    from kqs.runner.handlers import JobContext

#: The stderr line with which a command asks for its retry's delay, in seconds.
RETRY_AFTER: Final = b"kqs-retry-after:"
#: A stderr line longer than this (bytes) is text, never a retry-after line.
RETRY_AFTER_LINE_MAX: Final = 256

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


class StderrTail:
    """A command's stderr, fed as it streams: `tail`, its last `keep` bytes without its
    retry-after lines, and `retry_after`, the seconds the last valid one asked for.

    A retry-after line is `kqs-retry-after: <seconds>` (spaces around allowed), seconds a
    finite number, 0 or more; a line that starts so but names no such number is text.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.tail = bytearray()
        self.retry_after: float | None = None
        self._line = bytearray()  # the current line while it may be a retry-after line
        self._long = False  # the current line is too long for that: text, copied through

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of stderr."""
        *ended, rest = chunk.split(b"\n")
        for part in ended:
            self._add(part)
            self._end_line(b"\n")
        self._add(rest)
        self._trim()

    def close(self) -> None:
        """stderr has ended: settle its last line (which has no newline)."""
        self._end_line(b"")
        self._trim()

    def _add(self, part: bytes) -> None:
        if self._long:
            self.tail += part
            return
        self._line += part
        if len(self._line) > RETRY_AFTER_LINE_MAX:
            self.tail += self._line
            self._line.clear()
            self._long = True

    def _end_line(self, newline: bytes) -> None:
        """The current line ends (`newline` is what ended it): keep it unless it is a
        retry-after line."""
        if not self._long:
            seconds = _retry_after(bytes(self._line))
            if seconds is not None:
                self.retry_after = seconds
            else:
                self.tail += self._line + newline
        else:
            self.tail += newline
        self._line.clear()
        self._long = False

    def _trim(self) -> None:
        if len(self.tail) > self.keep:
            del self.tail[: -self.keep]


def _retry_after(line: bytes) -> float | None:
    """The seconds of a valid retry-after line; None for any other line."""
    text = line.strip()
    if not text.startswith(RETRY_AFTER):
        return None
    try:
        seconds = float(text[len(RETRY_AFTER) :].strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def _read_stderr(stream: asyncio.StreamReader | None, into: StderrTail) -> None:
    """Read `stream` to its end into `into`; its last line is settled even when the read
    is cut short (a child of the program holding stderr open)."""
    try:
        if stream is not None:
            while chunk := await stream.read(65536):
                into.feed(chunk)
    finally:
        into.close()


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
        stderr = StderrTail(MAX_ERROR_CHARS)
        reader = asyncio.ensure_future(_read_stderr(proc.stderr, stderr))
        killed = False
        try:
            try:
                async with asyncio.timeout(limit):
                    await _write_stdin(proc.stdin, stdin)
                    await proc.wait()
            except TimeoutError:
                killed = True
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
                await reader
        except TimeoutError:
            pass  # what was read so far is kept
        return self._outcome(proc.returncode, stderr, limit if killed else None)

    def _outcome(self, rc: int | None, stderr: StderrTail, limit_hit: float | None) -> Outcome:
        """The outcome of a run that ended with status `rc` (negative: killed by that
        signal), or was killed at its time limit `limit_hit`; a retry-after line counts only
        when the program's own ending means retry."""
        err = stderr.tail.decode("utf-8", "replace").strip()
        if limit_hit is not None:
            return Outcome.retry(timed_out(limit_hit, " (killed)") + (f": {err}" if err else ""))
        if rc == 0:
            return Outcome.done()
        what = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        text = f"{what}: {err}" if err else what
        if rc == self.dead_exit_code:
            return Outcome.dead(text)
        return Outcome.retry(text, stderr.retry_after)
