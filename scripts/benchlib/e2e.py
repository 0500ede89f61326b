"""Workload 3: end to end, insert -> run a trivial job -> done.

Two measurements per set-up (kqs with 1 and 2 runner processes; an RQ SimpleWorker; one
and two greenstalk reserve+delete loops on a bare beanstalkd):

- throughput: `jobs` jobs are inserted first (arrays of 100), then the consumers start;
  completed jobs/s is (jobs - 1) / (last done - first done), from the handler's own
  completion times, so process start-up does not count. `wall_s` (consumers started to
  last job done) is kept too.
- latency: with the consumers running, jobs are inserted at half that throughput for a
  few seconds; each carries its send time, and the handler records its done time.
  p50/p99 of done - sent. (At saturation, latency would only measure the queue.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.consumers import Consumers, DoneFile, GreenstalkLoops, KqsRunners, RqWorkers
from benchlib.loadgen import Load, run_load
from benchlib.procs import Beanstalkd, KqsServer, Redis, wait_until
from benchlib.settings import Settings
from benchlib.stats import median, percentile
from benchlib.targets import BeanstalkPut, KqsInsert, RqEnqueue, Target

log = logging.getLogger("bench.e2e")

PRELOAD_CLIENTS = 16
PRELOAD_BATCH = 100
PACED_CLIENTS = 8


@dataclass
class Setup:
    """One system's side of the end-to-end run: how to load it and what consumes."""

    key: str
    target: Target
    consumers: Consumers
    done: DoneFile
    jobs: int
    pids: list[int]
    wait_fed: Callable[[], object] = lambda: None
    #: kqs: its `stats` count of finished (done) jobs, to check every job was reported
    finished: Callable[[], int] | None = None


def preload(settings: Settings, setup: Setup) -> float:
    load = Load(
        setup.target,
        clients=PRELOAD_CLIENTS,
        procs=settings.procs,
        batch=PRELOAD_BATCH,
        total_jobs=setup.jobs,
    )
    result = run_load(load, setup.pids)
    if result.acked != setup.jobs:
        raise RuntimeError(f"{setup.key}: preload acked {result.acked} of {setup.jobs}")
    setup.wait_fed()
    return result.jobs_per_s


def throughput(setup: Setup) -> dict[str, Any]:
    """Consumers start on `jobs` waiting jobs; completed jobs/s from the handler's records."""
    setup.done.reset()
    reported_before = setup.finished() if setup.finished else 0
    started = time.time()
    setup.consumers.start()
    setup.done.wait_for(setup.jobs, timeout=max(60.0, setup.jobs / 100))
    finished = sorted(done for _, done in setup.done.records())
    span = finished[-1] - finished[0]
    result = {
        "jobs": len(finished),
        "jobs_per_s": round((len(finished) - 1) / span, 1) if span > 0 else 0.0,
        "wall_s": round(finished[-1] - started, 3),
    }
    if setup.finished is not None:
        count = setup.finished

        def all_reported() -> bool:
            return count() - reported_before >= setup.jobs

        wait_until(all_reported, 60.0, "kqs stats counting every job done")
        result["all_reported_s"] = round(time.time() - started, 3)
    return result


def latency(settings: Settings, setup: Setup, rate: float) -> dict[str, Any]:
    """Paced inserts at `rate` jobs/s while the consumers run; insert-to-done p50/p99."""
    setup.done.reset()
    batch = max(1, min(20, round(rate / 1000)))
    load = Load(
        setup.target,
        clients=PACED_CLIENTS,
        procs=1,
        batch=batch,
        warmup=0.0,
        duration=settings.latency_seconds,
        rate=rate,
    )
    result = run_load(load, setup.pids)
    setup.done.wait_for(result.acked, timeout=60.0)
    delays = sorted(done - sent for sent, done in setup.done.records())
    return {
        "paced_rate": round(rate, 1),
        "jobs": len(delays),
        "p50_ms": round(percentile(delays, 50) * 1000, 2),
        "p99_ms": round(percentile(delays, 99) * 1000, 2),
    }


def measure(settings: Settings, setup: Setup) -> dict[str, Any]:
    """Preload, drain (throughput), then the paced latency run; consumers stopped after."""
    insert_rate = preload(settings, setup)
    try:
        result = throughput(setup)
        result["latency"] = latency(settings, setup, rate=result["jobs_per_s"] / 2)
    finally:
        setup.consumers.stop()
    result["preload_jobs_per_s"] = round(insert_rate, 1)
    return result


def summarise(title: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "title": title,
        "jobs": runs[0]["jobs"],
        "jobs_per_s": round(median([r["jobs_per_s"] for r in runs]), 1),
        "latency_p50_ms": round(median([r["latency"]["p50_ms"] for r in runs]), 2),
        "latency_p99_ms": round(median([r["latency"]["p99_ms"] for r in runs]), 2),
        "runs": runs,
    }


def repeat(settings: Settings, setup: Setup, progress: Callable[[str], None]) -> dict[str, Any]:
    runs = []
    for i in range(settings.e2e_runs):
        runs.append(measure(settings, setup))
        progress(
            f"e2e run {i + 1}/{settings.e2e_runs} {setup.consumers.title}:"
            f" {runs[-1]['jobs_per_s']:,.0f} jobs/s,"
            f" p99 {runs[-1]['latency']['p99_ms']:.1f} ms at half that rate"
        )
    return summarise(setup.consumers.title, runs)


def run_kqs(settings: Settings, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    server = KqsServer(tmp / "kqs-e2e")
    server.start()
    try:
        done = DoneFile(tmp / "kqs-e2e-done.txt")
        pids = [server.pid, server.beanstalkd()[2]]
        results = {}
        for count in (1, 2):
            runners = KqsRunners(
                server.port, count, settings.runner_concurrency, done, tmp / "kqs-e2e-jobs.toml"
            )
            setup = Setup(
                f"kqs_{count}",
                KqsInsert(server.port, stamp=True),
                runners,
                done,
                settings.e2e_jobs,
                pids,
                wait_fed=lambda: server.wait_fed(120.0),
                finished=lambda: int(server.stats()["finished"]["done"]),
            )
            results[setup.key] = repeat(settings, setup, progress)
        return results
    finally:
        server.stop()


def run_rq(settings: Settings, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    redis = Redis(tmp / "redis-e2e")
    redis.start()
    try:
        done = DoneFile(tmp / "rq-e2e-done.txt")
        workers = RqWorkers(redis.url, 1, done, tmp / "rq-e2e-worker.log")
        target = RqEnqueue(redis.url, stamp=True)
        setup = Setup("rq_1", target, workers, done, settings.e2e_rq_jobs, [redis.pid])
        return {setup.key: repeat(settings, setup, progress)}
    finally:
        redis.stop()


def run_greenstalk(
    settings: Settings, tmp: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    bean = Beanstalkd()
    bean.start()
    try:
        done = DoneFile(tmp / "greenstalk-e2e-done.txt")
        results = {}
        for count in (1, 2):
            loops = GreenstalkLoops(bean.port, count, done)
            target = BeanstalkPut(bean.port, stamp=True)
            setup = Setup(f"greenstalk_{count}", target, loops, done, settings.e2e_jobs, [bean.pid])
            results[setup.key] = repeat(settings, setup, progress)
        return results
    finally:
        bean.stop()


def run(settings: Settings, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    return {
        **run_kqs(settings, tmp, progress),
        **run_rq(settings, tmp, progress),
        **run_greenstalk(settings, tmp, progress),
    }
