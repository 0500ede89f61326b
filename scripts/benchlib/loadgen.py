"""A multi-process load generator: `clients` closed-loop clients spread over `procs` processes.

Each client keeps exactly one request in flight (a request carries `batch` jobs). Async
targets run as coroutines on one event loop per process (uvloop when available); sync
targets (greenstalk, RQ) as one thread per client. Runs are either timed (a warm-up,
then `duration` seconds during which completed requests are counted and timed) or counted
(`total_jobs` split over the clients, timed from start to the last ack). Optionally paced
(`rate` jobs/s in all) for latency measurements below saturation.

Each process reports its own CPU time over the measured window, so a saturated load
generator shows up in the results (`client_cpu`, in cores) instead of passing as a slow
server. The parent samples the servers' CPU (from /proc) over the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import queue
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from benchlib.procs import BenchError, cpu_seconds
from benchlib.stats import percentile
from benchlib.targets import AsyncSession, SyncSession, Target

READY_TIMEOUT = 60.0
START_DELAY = 0.05


@dataclass(frozen=True)
class Load:
    target: Target
    clients: int = 1
    procs: int = 1
    batch: int = 1
    warmup: float = 0.5
    duration: float | None = None
    total_jobs: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if (self.duration is None) == (self.total_jobs is None):
            raise ValueError("a Load is timed (duration) or counted (total_jobs), not both")

    @property
    def timeout(self) -> float:
        """A bound on the whole run: timed runs get a minute of slack, counted ones more."""
        if self.duration is not None:
            return self.warmup + self.duration + 60.0
        return 900.0


@dataclass
class LoadResult:
    jobs: int
    requests: int
    acked: int
    seconds: float
    latencies: list[float]
    client_cpu: float
    server_cpu: float
    errors: int
    first_error: str = ""

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "jobs_per_s": round(self.jobs_per_s, 1),
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "ack_p50_ms": round(percentile(self.latencies, 50) * 1000, 3),
            "ack_p99_ms": round(percentile(self.latencies, 99) * 1000, 3),
            "client_cpu_cores": round(self.client_cpu, 2),
            "server_cpu_cores": round(self.server_cpu, 2),
            "errors": self.errors,
        }


@dataclass
class _ProcReport:
    jobs: int = 0
    requests: int = 0
    acked: int = 0
    latencies: bytes = b""
    cpu: float = 0.0
    errors: int = 0
    first_error: str = ""
    finished_at: float = 0.0


@dataclass
class _Window:
    """The shared clock of one run: when measuring starts and ends (time.monotonic)."""

    start: float
    end: float | None
    pace: float | None  # seconds between one client's requests, when paced

    def in_window(self, t: float) -> bool:
        return t >= self.start and (self.end is None or t < self.end)


@dataclass
class _Client:
    """One client's share of the work, and what it measured."""

    jobs_to_send: int | None
    jobs: int = 0
    requests: int = 0
    acked: int = 0  # every acknowledged job, in the window or not
    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: int = 0
    first_error: str = ""

    def next_batch(self, batch: int) -> int:
        if self.jobs_to_send is None:
            return batch
        return min(batch, self.jobs_to_send - self.acked - self.errors * batch)

    def record(self, n: int, sent: float, done: float, window: _Window) -> None:
        self.acked += n
        if window.in_window(done):
            self.jobs += n
            self.requests += 1
            self.latencies.append(done - sent)

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"


def _shares(total: int | None, parts: int) -> list[int | None]:
    if total is None:
        return [None] * parts
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- one process ----------------------------------------------------------------------------


def _report(clients: list[_Client], cpu: float, finished_at: float) -> _ProcReport:
    latencies = array("d")
    for client in clients:
        latencies.extend(client.latencies)
    errors = [c for c in clients if c.errors]
    return _ProcReport(
        jobs=sum(c.jobs for c in clients),
        requests=sum(c.requests for c in clients),
        acked=sum(c.acked for c in clients),
        latencies=latencies.tobytes(),
        cpu=cpu,
        errors=sum(c.errors for c in clients),
        first_error=errors[0].first_error if errors else "",
        finished_at=finished_at,
    )


def _should_go_on(client: _Client, load: Load, window: _Window) -> bool:
    if client.errors > 100:
        return False
    if window.end is not None:
        return time.monotonic() < window.end
    return client.next_batch(load.batch) > 0


async def _async_client(session: AsyncSession, client: _Client, load: Load, w: _Window) -> None:
    next_at = w.start if w.pace is not None else 0.0
    while _should_go_on(client, load, w):
        if w.pace is not None:
            next_at += w.pace
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        n = client.next_batch(load.batch)
        sent = time.monotonic()
        try:
            await session.send(n)
        except Exception as exc:
            client.failed(exc)
            continue
        client.record(n, sent, time.monotonic(), w)


def _sync_client(session: SyncSession, client: _Client, load: Load, w: _Window) -> None:
    next_at = w.start if w.pace is not None else 0.0
    while _should_go_on(client, load, w):
        if w.pace is not None:
            next_at += w.pace
            time.sleep(max(0.0, next_at - time.monotonic()))
        n = client.next_batch(load.batch)
        sent = time.monotonic()
        try:
            session.send(n)
        except Exception as exc:
            client.failed(exc)
            continue
        client.record(n, sent, time.monotonic(), w)


def _window(load: Load, start: float) -> _Window:
    measure = start + (load.warmup if load.duration is not None else 0.0)
    end = measure + load.duration if load.duration is not None else None
    pace = load.clients * load.batch / load.rate if load.rate else None
    return _Window(measure, end, pace)


async def _cpu_over(window: _Window, done: asyncio.Event) -> float:
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    before = time.process_time()
    if window.end is not None:
        await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    else:
        await done.wait()
    return time.process_time() - before


async def _async_main(load: Load, shares: list[int | None], ready: Any, go: Any) -> _ProcReport:
    opener: Any = load.target
    sessions: list[AsyncSession] = [await opener.open() for _ in shares]
    clients = [_Client(share) for share in shares]
    ready.put("ready")
    start = await asyncio.get_running_loop().run_in_executor(None, go.get, True, READY_TIMEOUT)
    window = _window(load, start)
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    done = asyncio.Event()
    cpu_task = asyncio.create_task(_cpu_over(window, done))
    await asyncio.gather(
        *(_async_client(s, c, load, window) for s, c in zip(sessions, clients, strict=True))
    )
    finished_at = time.monotonic()
    done.set()
    cpu = await cpu_task
    for session in sessions:
        with contextlib.suppress(OSError):
            await session.close()
    return _report(clients, cpu, finished_at)


def _thread_main(load: Load, shares: list[int | None], ready: Any, go: Any) -> _ProcReport:
    opener: Any = load.target
    sessions: list[SyncSession] = [opener.open() for _ in shares]
    clients = [_Client(share) for share in shares]
    ready.put("ready")
    start: float = go.get(True, READY_TIMEOUT)
    window = _window(load, start)
    threads = [
        threading.Thread(target=_sync_client, args=(s, c, load, window), daemon=True)
        for s, c in zip(sessions, clients, strict=True)
    ]
    time.sleep(max(0.0, start - time.monotonic()))
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, window.start - time.monotonic()))
    before = time.process_time()
    if window.end is not None:
        time.sleep(max(0.0, window.end - time.monotonic()))
        cpu = time.process_time() - before
    for thread in threads:
        thread.join(load.timeout)
    finished_at = time.monotonic()
    if window.end is None:
        cpu = time.process_time() - before
    for session in sessions:
        with contextlib.suppress(Exception):
            session.close()
    return _report(clients, cpu, finished_at)


def _process(load: Load, shares: list[int | None], ready: Any, go: Any, results: Any) -> None:
    try:
        if load.target.engine == "async":
            with contextlib.suppress(ImportError):
                import uvloop  # type: ignore[import-not-found,unused-ignore]

                uvloop.install()
            report = asyncio.run(_async_main(load, shares, ready, go))
        else:
            report = _thread_main(load, shares, ready, go)
    except BaseException as exc:
        ready.put(f"failed: {type(exc).__name__}: {exc}")
        report = _ProcReport(errors=1, first_error=f"{type(exc).__name__}: {exc}")
    results.put(report)


# -- the parent ----------------------------------------------------------------------------


def _server_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def run_load(load: Load, server_pids: list[int]) -> LoadResult:
    """Run one load to completion; `server_pids` are the processes whose CPU is sampled."""
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    procs = max(1, min(load.procs, load.clients))
    per_proc = [
        load.clients // procs + (1 if i < load.clients % procs else 0) for i in range(procs)
    ]
    job_shares = iter(_shares(load.total_jobs, load.clients))
    gos = [ctx.Queue() for _ in range(procs)]
    workers = [
        ctx.Process(
            target=_process,
            args=(load, [next(job_shares) for _ in range(n)], ready, go, results),
            daemon=True,
        )
        for n, go in zip(per_proc, gos, strict=True)
    ]
    for worker in workers:
        worker.start()
    try:
        return _drive(load, workers, gos, ready, results, server_pids)
    finally:
        for worker in workers:
            worker.join(5.0)
            if worker.is_alive():
                worker.kill()


def _drive(
    load: Load,
    workers: list[Any],
    gos: list[Any],
    ready: Any,
    results: Any,
    server_pids: list[int],
) -> LoadResult:
    for _ in workers:
        status = ready.get(True, READY_TIMEOUT)
        if status != "ready":
            raise BenchError(f"load generator: {status}")
    start = time.monotonic() + START_DELAY
    for go in gos:
        go.put(start)
    window = _window(load, start)
    time.sleep(max(0.0, window.start - time.monotonic()))
    cpu_before = _server_cpu(server_pids)
    if window.end is not None:
        time.sleep(max(0.0, window.end - time.monotonic()))
        cpu_after = _server_cpu(server_pids)
    reports: list[_ProcReport] = []
    deadline = time.monotonic() + load.timeout
    for _ in workers:
        try:
            reports.append(results.get(True, max(1.0, deadline - time.monotonic())))
        except queue.Empty:
            raise BenchError("load generator: a process did not report in time") from None
    if window.end is None:
        cpu_after = _server_cpu(server_pids)
        end = max(r.finished_at for r in reports)
    else:
        end = window.end
    return _combine(reports, end - window.start, cpu_after - cpu_before)


def _combine(reports: list[_ProcReport], seconds: float, server_cpu: float) -> LoadResult:
    latencies = array("d")
    for report in reports:
        latencies.frombytes(report.latencies)
    errors = [r.first_error for r in reports if r.first_error]
    return LoadResult(
        jobs=sum(r.jobs for r in reports),
        requests=sum(r.requests for r in reports),
        acked=sum(r.acked for r in reports),
        seconds=seconds,
        latencies=sorted(latencies),
        client_cpu=sum(r.cpu for r in reports) / seconds if seconds > 0 else math.nan,
        server_cpu=server_cpu / seconds if seconds > 0 else math.nan,
        errors=sum(r.errors for r in reports),
        first_error=errors[0] if errors else "",
    )
