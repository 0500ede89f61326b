"""What runs the end-to-end jobs: kqs runners, RQ SimpleWorkers, greenstalk loops.

All of them call the trivial job in benchlib.handlers, which appends `<sent> <done>` to a
shared file; `DoneFile` counts and reads those lines.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from benchlib.procs import KQS, ROOT, stop_process, wait_until
from benchlib.targets import JOB_TYPE

RQ = ROOT / ".bench-venv" / "bin" / "rq"
LOOP_MAX_SECONDS = 1800.0


class Consumers(Protocol):
    @property
    def title(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class DoneFile:
    """The completion records: counted incrementally, read as (sent, done) pairs."""

    path: Path
    _offset: int = 0
    _count: int = 0

    def reset(self) -> None:
        self.path.write_bytes(b"")
        self._offset = self._count = 0

    def count(self) -> int:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        # count whole lines only: a concurrent append may be caught half-written
        whole = chunk.rfind(b"\n") + 1
        self._count += chunk.count(b"\n", 0, whole)
        self._offset += whole
        return self._count

    def records(self) -> list[tuple[float, float]]:
        pairs = []
        for line in self.path.read_bytes().splitlines():
            sent, _, done = line.partition(b" ")
            pairs.append((float(sent), float(done)))
        return pairs

    def wait_for(self, n: int, timeout: float) -> float:
        return wait_until(lambda: self.count() >= n, timeout, f"{n} jobs done", interval=0.02)

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            BENCH_DONE_FILE=str(self.path),
            PYTHONPATH=str(ROOT / "scripts"),
        )


@dataclass
class KqsRunners:
    """`kqs run` processes serving the bench type with the recording handler."""

    port: int
    count: int
    concurrency: int
    done: DoneFile
    jobs_file: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"kqs, {self.count} runner process{'es' if self.count > 1 else ''}"

    def start(self) -> None:
        self.jobs_file.write_text(
            f"[types.{JOB_TYPE}]\n"
            'handler = "benchlib.handlers:kqs_record"\n'
            f"concurrency = {self.concurrency}\n"
        )
        log = self.jobs_file.with_suffix(".log").open("ab")
        argv = [str(KQS), "run", "--jobs", str(self.jobs_file)]
        argv += ["--server", f"127.0.0.1:{self.port}", "--log-level", "warning", "--grace", "5"]
        self.procs = [
            subprocess.Popen(argv, env=self.done.env(), stdout=log, stderr=log)
            for _ in range(self.count)
        ]
        log.close()

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs:
            stop_process(proc, timeout=30.0)
        self.procs = []


@dataclass
class RqWorkers:
    """RQ SimpleWorkers (jobs run in the worker process, no fork per job), quiet logging."""

    url: str
    count: int
    done: DoneFile
    log_file: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"RQ, {self.count} SimpleWorker{'s' if self.count > 1 else ''}"

    def start(self) -> None:
        log = self.log_file.open("ab")
        argv = [str(RQ), "worker", "-q", "-w", "rq.worker.SimpleWorker", "-u", self.url]
        self.procs = [
            subprocess.Popen(
                [*argv, "-n", f"bench-{i}-{time.time_ns()}", JOB_TYPE],
                env=self.done.env(),
                stdout=log,
                stderr=log,
            )
            for i in range(self.count)
        ]
        log.close()

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout=30.0)
        self.procs = []


def greenstalk_loop(port: int, done_path: str, stop: Any) -> None:
    """reserve -> record -> delete, until `stop` is set (bounded in time)."""
    import greenstalk

    os.environ["BENCH_DONE_FILE"] = done_path
    from benchlib.handlers import record

    deadline = time.monotonic() + LOOP_MAX_SECONDS
    with greenstalk.Client(("127.0.0.1", port), watch=JOB_TYPE, encoding=None) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                job = client.reserve(timeout=1)
            except greenstalk.TimedOutError:
                continue
            record(orjson.loads(job.body))
            client.delete(job)


@dataclass
class GreenstalkLoops:
    """Processes running the bare greenstalk reserve + delete loop on a bare beanstalkd."""

    port: int
    count: int
    done: DoneFile
    procs: list[Any] = field(default_factory=list)
    stop_event: Any = None

    @property
    def title(self) -> str:
        loops = "loops" if self.count > 1 else "loop"
        return f"beanstalkd, {self.count} greenstalk reserve+delete {loops}"

    def start(self) -> None:
        ctx = mp.get_context("fork")
        self.stop_event = ctx.Event()
        self.procs = [
            ctx.Process(
                target=greenstalk_loop,
                args=(self.port, str(self.done.path), self.stop_event),
                daemon=True,
            )
            for _ in range(self.count)
        ]
        for proc in self.procs:
            proc.start()

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()
        for proc in self.procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
        self.procs = []
