"""Handlers: how returns, exceptions, exit codes and timeouts map onto outcomes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from kqs.errors import ConfigError
from kqs.runner import Dead, Fail, JobContext, Retry
from kqs.runner.command import CommandHandler, StderrTail
from kqs.runner.config import CommandTarget, PythonTarget, TypeConfig
from kqs.runner.handlers import PythonHandler, ThreadPool, make_handler
from kqs.runner.lanes import Slots
from kqs.runner.outcome import MAX_ERROR_CHARS, Outcome, outcome_of_exception
from tests.support import wait_until


async def no_touch() -> bool:
    return True


def job(attempt: int = 1, ttr: int = 30, data: Any = None) -> JobContext:
    return JobContext(
        id="n1-0001",
        type="t",
        data=data if data is not None else {"x": 1},
        attempt=attempt,
        ttr=ttr,
        touch=no_touch,
        max_attempts=5,
        prio=10000,
    )


BODY = {"id": "n1-0001", "type": "t", "data": {"x": 1}, "prio": 10000, "delay": 0, "ttr": 30}


def run_python(func: Callable[[JobContext], Any], limit: float | None = None) -> Outcome:
    threads = ThreadPool(2)
    try:
        return asyncio.run(PythonHandler(func, threads).run(job(), BODY, limit))
    finally:
        threads.shutdown()


# --- the mapping of exceptions ----------------------------------------------------------


def test_exception_mapping() -> None:
    assert outcome_of_exception(Retry()) == Outcome("retry", "retry requested", None)
    assert outcome_of_exception(Retry("later", delay=5)) == Outcome("retry", "later", 5)
    assert outcome_of_exception(Fail("bad input")) == Outcome("dead", "Fail: bad input")
    assert Dead is Fail
    assert outcome_of_exception(ValueError("nope")) == Outcome("retry", "ValueError: nope")
    assert outcome_of_exception(KeyError()) == Outcome("retry", "KeyError")


def test_error_text_keeps_the_tail() -> None:
    out = outcome_of_exception(RuntimeError("x" * 10_000 + "the cause"))
    assert out.error is not None
    assert len(out.error) == MAX_ERROR_CHARS
    assert out.error.startswith("...") and out.error.endswith("the cause")


# --- Python handlers --------------------------------------------------------------------


def test_sync_handler_runs_in_a_thread_and_returns_done() -> None:
    seen: list[tuple[str, Any, int, bool]] = []

    def handler(ctx: JobContext) -> str:
        seen.append(
            (ctx.id, ctx.data, ctx.attempt, threading.current_thread().name != "MainThread")
        )
        return "ignored"

    assert run_python(handler) == Outcome.done()
    assert seen == [("n1-0001", {"x": 1}, 1, True)]


def test_async_handler_runs_on_the_loop() -> None:
    async def handler(ctx: JobContext) -> None:
        assert threading.current_thread() is threading.main_thread()
        await asyncio.sleep(0)

    assert run_python(handler) == Outcome.done()


def test_callable_object_with_async_call() -> None:
    class Handler:
        async def __call__(self, ctx: JobContext) -> None:
            raise Retry("again", delay=3)

    assert run_python(Handler()) == Outcome("retry", "again", 3)


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (Retry("busy", delay=2), Outcome("retry", "busy", 2)),
        (Fail("never"), Outcome("dead", "Fail: never")),
        (Dead("gone"), Outcome("dead", "Fail: gone")),
        (
            ZeroDivisionError("division by zero"),
            Outcome("retry", "ZeroDivisionError: division by zero"),
        ),
        (TimeoutError("own timeout"), Outcome("retry", "TimeoutError: own timeout")),
        (SystemExit(3), Outcome("retry", "SystemExit: 3")),
        (SystemExit(0), Outcome("retry", "SystemExit: 0")),
        (KeyboardInterrupt("stop"), Outcome("retry", "KeyboardInterrupt: stop")),
        (KeyboardInterrupt(), Outcome("retry", "KeyboardInterrupt")),
    ],
)
def test_raised_exceptions_map(is_async: bool, exc: BaseException, expected: Outcome) -> None:
    def sync(ctx: JobContext) -> None:
        raise exc

    async def coro(ctx: JobContext) -> None:
        raise exc

    assert run_python(coro if is_async else sync) == expected


def test_async_handler_is_cancelled_at_its_timeout() -> None:
    cancelled = []

    async def handler(ctx: JobContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    assert run_python(handler, limit=0.05) == Outcome("retry", "timed out after 0.05 s")
    assert cancelled == [True]


def test_sync_handler_past_its_timeout_is_a_failure_and_its_thread_keeps_a_slot() -> None:
    release = threading.Event()
    slots = Slots(2)
    threads = ThreadPool(2, name="t", hold=slots.hold)

    def handler(ctx: JobContext) -> None:
        release.wait(10)

    async def main() -> None:
        slots.take(1)  # the job's own slot, as the worker takes it
        out = await PythonHandler(handler, threads).run(job(), BODY, 0.05)
        assert out == Outcome("retry", "timed out after 0.05 s")
        slots.give(1)  # the worker gives the job's slot back: the thread keeps one
        assert (slots.used, threads.busy, threads.outliving) == (1, 1, 1)
        release.set()
        await asyncio.to_thread(wait_until, lambda: threads.busy == 0, what="thread done")
        for _ in range(100):
            if slots.used == 0:
                break
            await asyncio.sleep(0.01)
        assert (slots.used, threads.outliving) == (0, 0)

    asyncio.run(main())
    threads.shutdown()


def test_a_thread_outliving_its_event_loop_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """The slot's give-back is scheduled on the runner's loop; a loop closed by the time
    the thread returns (the runner stopped) is not an error."""
    release = threading.Event()
    slots = Slots(1)
    threads = ThreadPool(1, hold=slots.hold)

    def handler(ctx: JobContext) -> None:
        release.wait(10)

    out = asyncio.run(PythonHandler(handler, threads).run(job(), BODY, 0.05))
    assert out.kind == "retry" and slots.used == 1
    release.set()
    with caplog.at_level(logging.ERROR):
        threads.executor.shutdown(wait=True)
    assert threads.busy == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_sync_run_given_up_before_it_started_holds_nothing() -> None:
    """A run still queued (its pool full) when it times out is cancelled, never run."""
    release = threading.Event()
    slots = Slots(1)
    threads = ThreadPool(1, hold=slots.hold)
    ran: list[str] = []

    def blocker() -> None:
        release.wait(10)

    def handler(ctx: JobContext) -> None:
        ran.append(ctx.id)

    async def main() -> Outcome:
        threads.executor.submit(blocker)
        return await PythonHandler(handler, threads).run(job(), BODY, 0.05)

    assert asyncio.run(main()) == Outcome("retry", "timed out after 0.05 s")
    release.set()
    threads.executor.shutdown(wait=True)
    assert ran == [] and slots.used == 0 and threads.outliving == 0


def test_touch_sync_runs_the_touch_on_the_loop_and_not_from_it() -> None:
    touched_on: list[bool] = []

    async def touch() -> bool:
        touched_on.append(threading.current_thread() is threading.main_thread())
        return True

    async def main() -> None:
        ctx = JobContext("n1-1", "t", None, 1, 30, touch, loop=asyncio.get_running_loop())
        assert await asyncio.to_thread(ctx.touch_sync) is True
        with pytest.raises(RuntimeError, match="await touch"):
            ctx.touch_sync()  # on the loop itself it would wait for itself

    asyncio.run(main())
    assert touched_on == [True]
    with pytest.raises(RuntimeError, match="no event loop"):
        job().touch_sync()


def test_touch_sync_gives_up_after_its_timeout() -> None:
    async def slow_touch() -> bool:
        await asyncio.sleep(30)
        return True

    async def main() -> bool:
        ctx = JobContext("n1-1", "t", None, 1, 30, slow_touch, loop=asyncio.get_running_loop())
        return await asyncio.to_thread(ctx.touch_sync, 0.05)

    assert asyncio.run(main()) is False


# --- command handlers -------------------------------------------------------------------


def sh(script: str, dead_exit_code: int = 100) -> CommandHandler:
    return CommandHandler(("/bin/sh", "-c", script), dead_exit_code)


def run_command(handler: CommandHandler, limit: float | None = None, ttr: int = 30) -> Outcome:
    return asyncio.run(handler.run(job(ttr=ttr), BODY, limit))


def test_command_exit_0_is_done_and_stdin_carries_the_job(tmp_path: Path) -> None:
    out = tmp_path / "stdin.json"
    env = tmp_path / "env"
    handler = sh(f'cat > {out}; echo "$KQS_JOB_ID $KQS_JOB_TYPE $KQS_ATTEMPT" > {env}')
    assert run_command(handler) == Outcome.done()
    assert orjson.loads(out.read_bytes()) == {**BODY, "attempt": 1}
    assert env.read_text().split() == ["n1-0001", "t", "1"]


def test_command_nonzero_exit_is_retry_with_the_stderr_tail() -> None:
    out = run_command(sh("echo first >&2; echo 'it broke' >&2; exit 3"))
    assert out == Outcome("retry", "exit code 3: first\nit broke")


def test_command_dead_exit_code_is_dead() -> None:
    assert run_command(sh("echo 'bad address' >&2; exit 100")) == Outcome(
        "dead", "exit code 100: bad address"
    )
    assert run_command(sh("exit 7", dead_exit_code=7)) == Outcome("dead", "exit code 7")
    assert run_command(sh("exit 100", dead_exit_code=7)).kind == "retry"


def test_command_asks_for_its_retry_delay_on_stderr() -> None:
    script = (
        "echo oops >&2; echo 'kqs-retry-after: 5' >&2; echo ' kqs-retry-after:  42.5 ' >&2;"
        " echo after >&2; exit 3"
    )
    assert run_command(sh(script)) == Outcome("retry", "exit code 3: oops\nafter", 42.5)
    # the line counts for a signal too; it is never part of the error
    assert run_command(sh("echo 'kqs-retry-after: 3' >&2; kill -9 $$")) == Outcome(
        "retry", "killed by signal 9", 3
    )


def test_the_last_stderr_line_counts_when_a_child_keeps_stderr_open() -> None:
    """A background child holding stderr open: the read is cut after a second (on uvloop,
    `kqs run`'s loop, the program's exit does not wait for its pipes), and the last line,
    with no newline, is still read: the delay, and the error text."""

    async def run_until_the_child_is_gone(script: str) -> Outcome:
        out = await sh(f"sleep 1.5 & {script}").run(job(), BODY, None)
        await asyncio.sleep(1.0)  # the child exits, its end of stderr with it
        return out

    out = uvloop.run(run_until_the_child_is_gone("printf 'boom\\nkqs-retry-after: 30' >&2; exit 3"))
    assert out == Outcome("retry", "exit code 3: boom", 30)
    out = uvloop.run(run_until_the_child_is_gone("printf 'line1\\nboom' >&2; exit 3"))
    assert out == Outcome("retry", "exit code 3: line1\nboom")


def test_a_retry_delay_line_only_counts_when_the_exit_means_retry() -> None:
    line = "echo 'kqs-retry-after: 5' >&2; "
    assert run_command(sh(line + "exit 0")) == Outcome.done()
    assert run_command(sh(line + "exit 100")) == Outcome("dead", "exit code 100")
    out = run_command(sh(line + "sleep 30"), limit=0.3)
    assert out == Outcome("retry", "timed out after 0.3 s (killed)")


def test_a_retry_delay_line_that_names_no_delay_is_text() -> None:
    for value in ("soon", "-1", "nan", ""):
        out = run_command(sh(f"echo 'kqs-retry-after: {value}' >&2; exit 3"))
        assert out == Outcome("retry", f"exit code 3: kqs-retry-after: {value}".strip())


def test_a_retry_delay_line_counts_even_before_the_kept_tail() -> None:
    script = "echo 'kqs-retry-after: 7' >&2; head -c 5000 /dev/zero | tr '\\0' x >&2; exit 3"
    out = run_command(sh(script))
    assert out.delay == 7 and out.error is not None
    assert out.error == "..." + "x" * (MAX_ERROR_CHARS - 3)


def test_stderr_tail_is_the_same_however_the_stream_is_cut() -> None:
    stream = b"first\r\nkqs-retry-after: 1\n" + b"y" * 600 + b"\nkqs-retry-after: 9\r\nlast"
    whole = StderrTail(100)
    whole.feed(stream)
    whole.close()
    bytewise = StderrTail(100)
    for n in range(len(stream)):
        bytewise.feed(stream[n : n + 1])
    bytewise.close()
    assert whole.retry_after == bytewise.retry_after == 9
    assert bytes(whole.tail) == bytes(bytewise.tail) == b"y" * 95 + b"\nlast"


def test_command_that_ignores_stdin_is_fine() -> None:
    assert run_command(sh("exit 0")) == Outcome.done()


def test_command_killed_at_its_timeout_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    script = f"sleep 30 & echo $! > {pidfile}; echo started >&2; wait"
    started = time.monotonic()
    out = run_command(sh(script), limit=0.3)
    assert time.monotonic() - started < 5
    assert out.kind == "retry"
    assert out.error is not None and out.error.startswith("timed out after 0.3 s (killed)")
    child = int(pidfile.read_text())
    wait_until(lambda: gone(child), timeout=5, what="the command's child to be killed")


def gone(pid: int) -> bool:
    """True if process `pid` has exited (no longer exists, or is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(") ", 1)[1].startswith("Z")


def test_command_timeout_defaults_to_the_ttr() -> None:
    out = run_command(sh("sleep 30"), ttr=1)
    assert out.kind == "retry" and out.error is not None and "timed out after 1 s" in out.error


def test_command_killed_by_a_signal() -> None:
    assert run_command(sh("kill -9 $$")) == Outcome("retry", "killed by signal 9")


def test_command_cancelled_is_killed() -> None:
    async def main() -> float:
        task = asyncio.create_task(sh("sleep 30").run(job(), BODY, None))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(main()) < 5


def test_command_that_cannot_start_is_a_retry(tmp_path: Path) -> None:
    gone = CommandHandler((str(tmp_path / "gone"),), 100)
    out = run_command(gone)
    assert out.kind == "retry" and out.error is not None and "cannot start" in out.error


# --- making handlers from the config ----------------------------------------------------


def type_config(handler: PythonTarget | CommandTarget) -> TypeConfig:
    return TypeConfig(name="t", handler=handler)


def test_make_handler_imports_the_target() -> None:
    threads = ThreadPool(1)
    handler = make_handler(type_config(PythonTarget("json:dumps")), threads)
    assert isinstance(handler, PythonHandler)
    assert make_handler(type_config(PythonTarget("os.path:join")), threads)
    threads.shutdown()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (PythonTarget("no_such_module_kqs:f"), "types.t.handler: cannot import module"),
        (PythonTarget("json:no_such_function"), "types.t.handler: 'json' has no"),
        (PythonTarget("json:__doc__"), "types.t.handler: 'json:__doc__' is not callable"),
        (CommandTarget(("/nonexistent/program",)), "types.t.command: '/nonexistent/program'"),
        (CommandTarget(("no-such-program-kqs",)), "types.t.command: "),
    ],
)
def test_make_handler_errors_name_the_key(
    target: PythonTarget | CommandTarget, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_handler(type_config(target), ThreadPool(1))
    assert str(err.value).startswith(message), str(err.value)


def test_make_handler_finds_commands_on_the_path() -> None:
    handler = make_handler(type_config(CommandTarget(("sh", "-c", "exit 0"))), ThreadPool(1))
    assert isinstance(handler, CommandHandler)
