"""Handlers: how returns, exceptions, exit codes and timeouts map onto outcomes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from kqs.errors import ConfigError
from kqs.runner import Dead, Fail, JobContext, Retry
from kqs.runner.config import CommandTarget, PythonTarget, TypeConfig
from kqs.runner.handlers import CommandHandler, PythonHandler, ThreadPool, make_handler
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


def test_sync_handler_past_its_timeout_is_a_failure() -> None:
    release = threading.Event()
    threads = ThreadPool(1)

    def handler(ctx: JobContext) -> None:
        release.wait(10)

    async def main() -> tuple[Outcome, int]:
        out = await PythonHandler(handler, threads).run(job(), BODY, 0.05)
        return out, threads.busy

    out, busy = asyncio.run(main())
    assert out == Outcome("retry", "timed out after 0.05 s")
    assert busy == 1  # its thread cannot be stopped; it is counted until it returns
    release.set()
    threads.executor.shutdown(wait=True)
    assert threads.busy == 0


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
