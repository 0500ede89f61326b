"""Workloads 1 and 2: insert throughput and ack latency, kqs against its peers.

Three shapes (100-byte JSON payloads): one client inserting sequentially; 64 clients
with one single-job insert in flight each; 16 clients inserting arrays of 100. Systems:
kqs (acks after the journal fsync), a bare beanstalkd without binlog (acks before any
disk write; raw pipelined protocol, and greenstalk's synchronous client), RQ `enqueue`
on Redis with default persistence, and RQ on Redis with appendonly + appendfsync always.

All servers run at once (idle ones cost nothing) and the runs are interleaved, run by
run and shape by shape, so a slower moment of a shared machine hits every system alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.loadgen import Load, run_load
from benchlib.procs import Beanstalkd, KqsServer, Redis
from benchlib.settings import Settings
from benchlib.stats import median
from benchlib.targets import BeanstalkPut, GreenstalkPut, KqsInsert, RqEnqueue, Target

log = logging.getLogger("bench.insert")


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    clients: int
    batch: int


SHAPES = (
    Shape("seq", "1 client, sequential", 1, 1),
    Shape("c64", "64 clients, 1 insert in flight each", 64, 1),
    Shape("arr100", "16 clients, arrays of 100", 16, 100),
)


@dataclass(frozen=True)
class System:
    key: str
    title: str
    target: Target
    pids: list[int]
    shapes: tuple[str, ...] = ("seq", "c64", "arr100")
    #: kqs: its journal's counters (`stats`), for fsyncs/s and records per fsync
    journal: Callable[[], dict[str, Any]] | None = None


SYSTEM_TITLES = {
    "kqs": "kqs insert (durable: fsync before ack)",
    "beanstalkd": "beanstalkd put, raw pipelined protocol (no binlog)",
    "greenstalk": "beanstalkd put via greenstalk (no binlog)",
    "rq": "RQ enqueue, Redis default persistence",
    "rq_aof": "RQ enqueue, Redis appendfsync always (durable)",
}


@contextlib.contextmanager
def servers(tmp: Path) -> Iterator[list[System]]:
    """Start every system under test; stop them all afterwards."""
    kqs = KqsServer(tmp / "kqs-insert")
    bean = Beanstalkd()
    redis = Redis(tmp / "redis-default")
    redis_aof = Redis(tmp / "redis-aof", durable=True)
    try:
        kqs.start()
        bean.start()
        redis.start()
        redis_aof.start()
        kqs_pids = [kqs.pid, kqs.beanstalkd()[2]]
        yield [
            System(
                "kqs",
                SYSTEM_TITLES["kqs"],
                KqsInsert(kqs.port),
                kqs_pids,
                journal=lambda: dict(kqs.stats()["journal"]),
            ),
            System("beanstalkd", SYSTEM_TITLES["beanstalkd"], BeanstalkPut(bean.port), [bean.pid]),
            System(
                "greenstalk",
                SYSTEM_TITLES["greenstalk"],
                GreenstalkPut(bean.port),
                [bean.pid],
                ("seq", "c64"),
            ),
            System("rq", SYSTEM_TITLES["rq"], RqEnqueue(redis.url), [redis.pid]),
            System("rq_aof", SYSTEM_TITLES["rq_aof"], RqEnqueue(redis_aof.url), [redis_aof.pid]),
        ]
    finally:
        kqs.stop()
        bean.stop()
        redis.stop()
        redis_aof.stop()


def journal_rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """fsyncs/s and records per fsync between two snapshots of kqs's journal stats."""
    fsyncs = after["fsyncs"] - before["fsyncs"]
    records = after["records_written"] - before["records_written"]
    return {
        "fsyncs_per_s": round(fsyncs / seconds, 1),
        "records_per_fsync": round(records / fsyncs, 1) if fsyncs else None,
    }


def one_run(settings: Settings, system: System, shape: Shape) -> dict[str, Any]:
    """One timed run; for kqs, with its journal's group-commit figures over the run."""
    load = Load(
        system.target,
        clients=shape.clients,
        procs=settings.procs,
        batch=shape.batch,
        warmup=settings.warmup,
        duration=settings.duration,
    )
    before = system.journal() if system.journal else None
    result = run_load(load, system.pids)
    if result.first_error:
        log.warning("%s %s: %s", system.key, shape.key, result.first_error)
    summary = result.summary()
    if system.journal and before is not None:
        summary.update(journal_rates(before, system.journal(), settings.warmup + settings.duration))
    return summary


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the runs, and the runs themselves."""
    keys = ["jobs_per_s", "ack_p50_ms", "ack_p99_ms", "client_cpu_cores", "server_cpu_cores"]
    if "records_per_fsync" in runs[0]:
        keys += ["fsyncs_per_s", "records_per_fsync"]
    summary: dict[str, Any] = {
        k: round(median([r[k] for r in runs if r.get(k) is not None]), 3) for k in keys
    }
    summary["errors"] = sum(r["errors"] for r in runs)
    summary["runs"] = runs
    return summary


def run(settings: Settings, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every shape on every system, `settings.runs` times, interleaved."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with servers(tmp) as systems:
        for i in range(settings.runs):
            for shape in SHAPES:
                for system in systems:
                    if shape.key not in system.shapes:
                        continue
                    summary = one_run(settings, system, shape)
                    raw.setdefault(system.key, {}).setdefault(shape.key, []).append(summary)
                    progress(
                        f"insert run {i + 1}/{settings.runs} {shape.key:6} {system.key:10}"
                        f" {summary['jobs_per_s']:>10,.0f} jobs/s"
                    )
    return {
        "shapes": {
            s.key: {"title": s.title, "clients": s.clients, "batch": s.batch} for s in SHAPES
        },
        "systems": {
            key: {"title": SYSTEM_TITLES[key], **{s: summarise(r) for s, r in by_shape.items()}}
            for key, by_shape in raw.items()
        },
    }
