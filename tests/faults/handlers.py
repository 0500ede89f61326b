"""Job handlers for the fault-injection suite, run by `kqs run` child processes
(`tests.faults.handlers:<name>`). Each run that completes appends one line
`<job id> <attempt> <pid>` to `$KQS_TEST_OUT/<job type>.log` with one O_APPEND write, so
lines of concurrent runs never mix; the test counts the lines to find lost jobs (acked,
never run) and duplicated runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

from kqs.runner import JobContext
from tests.integration.runner_handlers import OUT_ENV


def append(log: str, line: str) -> None:
    """Append `line` to $KQS_TEST_OUT/<log>.log in one write."""
    path = Path(os.environ[OUT_ENV]) / f"{log}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def ran(job: JobContext) -> None:
    append(job.type, f"{job.id} {job.attempt} {os.getpid()}\n")


async def record(job: JobContext) -> None:
    """Succeeds at once, recording the run."""
    ran(job)


async def slow_record(job: JobContext) -> None:
    """Runs `data["s"]` seconds, then records the run."""
    await asyncio.sleep(float(job.data["s"]))
    ran(job)


async def hang_first(job: JobContext) -> None:
    """Hangs on its first attempt (far past any TTR or timeout); then records and succeeds."""
    if job.attempt == 1:
        await asyncio.sleep(3600)
    ran(job)


def kill_runner(job: JobContext) -> None:
    """Kills its own process (the runner) with SIGKILL: a poison job for the process."""
    append(f"{job.type}-start", f"{job.id} {job.attempt} {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def poison(job: JobContext) -> None:
    """Always fails."""
    append(f"{job.type}-start", f"{job.id} {job.attempt} {os.getpid()}\n")
    raise RuntimeError("poison")


def runs(out: Path, log: str) -> Counter[str]:
    """Job id -> how many runs of it `<out>/<log>.log` records (complete lines only)."""
    path = out / f"{log}.log"
    if not path.exists():
        return Counter()
    return Counter(
        line.split(" ", 1)[0] for line in path.read_text().splitlines() if line.count(" ") == 2
    )
