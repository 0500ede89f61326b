"""Job handlers for the runner's integration tests. Runners import them from a child
process (`tests.integration.runner_handlers:<name>`); each writes what it did as one line
`<event> <job id> <attempt> <unix time> <pid>` to `$KQS_TEST_OUT/<log>.log`, so the test
checks from outside. A line is one O_APPEND write: lines from concurrent runs never mix.

Run as a program (`python -m tests.integration.runner_handlers`) it is a command handler:
it reads the job from stdin, records it, and exits with `data["exit"]` (a number, or a
list indexed by attempt - 1, the last entry repeating); failing, it asks for a retry
after `data["retry_after"]` seconds if given.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kqs.runner import Fail, JobContext

OUT_ENV = "KQS_TEST_OUT"


def record(log: str, event: str, job_id: str, attempt: int) -> None:
    """Append one line to $KQS_TEST_OUT/<log>.log."""
    line = f"{event} {job_id} {attempt} {time.time():.6f} {os.getpid()}\n".encode()
    fd = os.open(Path(os.environ[OUT_ENV]) / f"{log}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def noop(job: JobContext) -> None:
    """Does nothing (throughput measurements)."""


def ok(job: JobContext) -> None:
    """Succeeds."""
    record("ok", "run", job.id, job.attempt)


async def ok_async(job: JobContext) -> None:
    """Succeeds, on the event loop."""
    record("ok", "run", job.id, job.attempt)


def inspect(job: JobContext) -> None:
    """Records the size of `data["text"]` and the Python type of `data["blob"]`."""
    blob = job.data.get("blob")
    record("inspect", f"{len(job.data['text'])}:{type(blob).__name__}:{len(blob)}", job.id, 1)


def flaky(job: JobContext) -> None:
    """Fails the first `data["fail"]` attempts, then succeeds."""
    record("flaky", "run", job.id, job.attempt)
    if job.attempt <= int(job.data["fail"]):
        raise RuntimeError(f"flaky failure on attempt {job.attempt}")


def poison(job: JobContext) -> None:
    """Always fails (retry)."""
    record("poison", "run", job.id, job.attempt)
    raise ValueError(f"poison pill {job.data}")


def hopeless(job: JobContext) -> None:
    """Fails for good at once."""
    record("hopeless", "run", job.id, job.attempt)
    raise Fail("cannot ever work")


def interrupted(job: JobContext) -> None:
    """Raises KeyboardInterrupt on its first attempt, then succeeds."""
    record("interrupted", "run", job.id, job.attempt)
    if job.attempt == 1:
        raise KeyboardInterrupt("interrupted in the handler")


async def interrupted_async(job: JobContext) -> None:
    """Like `interrupted`, on the event loop."""
    interrupted(job)


async def interrupted_in_a_task(job: JobContext) -> None:
    """Raises KeyboardInterrupt in a task it awaits: asyncio lets that out of the loop."""
    record("interrupted", "run", job.id, job.attempt)

    async def inner() -> None:
        raise KeyboardInterrupt("interrupted in a task")

    await asyncio.gather(inner())


def touching(job: JobContext) -> None:
    """Touches its job from its thread; records `touched:<result>`."""
    record("touch", f"touched:{job.touch_sync()}", job.id, job.attempt)


async def touching_async(job: JobContext) -> None:
    """Touches its job on the event loop; records `touched:<result>`."""
    record("touch", f"touched:{await job.touch()}", job.id, job.attempt)


def by_attempt(value: Any, attempt: int) -> Any:
    """`value`, or for a list its entry for `attempt` (the last one repeating)."""
    return value[min(attempt, len(value)) - 1] if isinstance(value, list) else value


async def slow(job: JobContext) -> None:
    """Runs `data["seconds"]` seconds (by attempt); records its start and end."""
    record("slow", "start", job.id, job.attempt)
    await asyncio.sleep(float(by_attempt(job.data["seconds"], job.attempt)))
    record("slow", "end", job.id, job.attempt)


def slow_sync(job: JobContext) -> None:
    """Like `slow`, in a thread."""
    record("slow", "start", job.id, job.attempt)
    time.sleep(float(by_attempt(job.data["seconds"], job.attempt)))
    record("slow", "end", job.id, job.attempt)


@dataclass(frozen=True, slots=True)
class Record:
    event: str
    id: str
    attempt: int
    at: float
    pid: int


def read_records(out: Path, log: str) -> list[Record]:
    """Every complete line of `<out>/<log>.log`, in order."""
    path = out / f"{log}.log"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        event, job_id, attempt, at, pid = line.split(" ")
        records.append(Record(event, job_id, int(attempt), float(at), int(pid)))
    return records


def command_main() -> int:
    """The command handler: record the job from stdin, exit as `data["exit"]` says."""
    job: dict[str, Any] = orjson.loads(sys.stdin.buffer.read())
    attempt = int(job["attempt"])
    if os.environ.get("KQS_ATTEMPT") != str(attempt) or os.environ.get("KQS_JOB_ID") != job["id"]:
        print("environment does not match stdin", file=sys.stderr)
        return 2
    record("command", "run", job["id"], attempt)
    Path(os.environ[OUT_ENV], f"stdin-{job['id']}-{attempt}.json").write_bytes(orjson.dumps(job))
    code = by_attempt(job["data"]["exit"], attempt)
    if code:
        print(f"command failing with {code} on attempt {attempt}", file=sys.stderr)
        if "retry_after" in job["data"]:
            print(f"kqs-retry-after: {job['data']['retry_after']}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(command_main())


def digest(job: JobContext) -> None:
    """Records a SHA-256 of the data as the handler sees it (bytes hashed as they are)."""
    import hashlib

    data = job.data
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    record("digest", hashlib.sha256(raw).hexdigest(), job.id, job.attempt)
