"""Workload 4: a backlog of delayed jobs pending (1,000,000; --quick 100,000).

Two kqs servers run side by side: one gets the backlog (delay one day, arrays of 100
from 16 clients) and is waited on until it is all fed into beanstalkd; the other stays
empty. Then: the memory of each kqs and its beanstalkd (VmRSS from /proc); the 64-client
insert rate of each, alternating run by run so both see the same machine; and a restart
of the backlog server (SIGTERM, wait for the exit, start on the same data directory)
timed to its first successful `ping`, and on to the end of its re-verification against
beanstalkd.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib.loadgen import Load, run_load
from benchlib.procs import KqsServer, rss_bytes, wait_until
from benchlib.settings import Settings
from benchlib.stats import median
from benchlib.targets import KqsInsert

BACKLOG_DELAY = 86_400
MIB = 2**20


def memory(server: KqsServer) -> dict[str, float]:
    bean_pid = server.beanstalkd()[2]
    return {
        "kqs_rss_mb": round(rss_bytes(server.pid) / MIB, 1),
        "beanstalkd_rss_mb": round(rss_bytes(bean_pid) / MIB, 1),
    }


def insert_once(settings: Settings, server: KqsServer) -> dict[str, Any]:
    """One timed run of 64 clients, single inserts."""
    load = Load(
        KqsInsert(server.port),
        clients=64,
        procs=settings.procs,
        warmup=settings.warmup,
        duration=settings.duration,
    )
    return run_load(load, [server.pid, server.beanstalkd()[2]]).summary()


def insert_rates(settings: Settings, empty: KqsServer, full: KqsServer) -> dict[str, Any]:
    """The 64-client insert rate of both servers; medians over the runs.

    The empty server first gets one unmeasured run (the other has just taken the whole
    backlog), then the two alternate, in turn first (ABBA), so neither gains by order."""
    insert_once(settings, empty)
    runs: dict[str, list[dict[str, Any]]] = {"empty": [], "backlog": []}
    servers = {"empty": empty, "backlog": full}
    for i in range(settings.runs):
        for key in ("empty", "backlog") if i % 2 == 0 else ("backlog", "empty"):
            runs[key].append(insert_once(settings, servers[key]))
    return {
        key: {
            "jobs_per_s": round(median([r["jobs_per_s"] for r in rs]), 1),
            "ack_p99_ms": round(median([r["ack_p99_ms"] for r in rs]), 3),
            "runs": rs,
        }
        for key, rs in runs.items()
    }


def fill(settings: Settings, server: KqsServer) -> dict[str, Any]:
    load = Load(
        KqsInsert(server.port, delay=BACKLOG_DELAY),
        clients=16,
        procs=settings.procs,
        batch=100,
        total_jobs=settings.backlog_jobs,
    )
    result = run_load(load, [server.pid, server.beanstalkd()[2]])
    fed_after = server.wait_fed(600.0)
    return {
        "jobs": result.acked,
        "insert_jobs_per_s": round(result.jobs_per_s, 1),
        "fed_after_s": round(fed_after, 2),
    }


def restart(server: KqsServer) -> dict[str, Any]:
    """SIGTERM, start again; seconds to the exit, to the first ping, to verified."""
    stop_s = server.stop()
    start_s = server.start(timeout=600.0)
    serving = memory(server)

    def verified() -> bool:
        return not server.stats().get("verifying", False)

    verify_s = wait_until(verified, 600.0, "kqs re-verifying its jobs", interval=0.1)
    return {
        "stop_s": round(stop_s, 2),
        "start_to_ping_s": round(start_s, 2),
        "restart_to_serving_s": round(stop_s + start_s, 2),
        "then_verified_s": round(verify_s, 2),
        "memory_at_first_ping": serving,
        "memory_verified": memory(server),
    }


def run(settings: Settings, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    empty = KqsServer(tmp / "kqs-empty")
    server = KqsServer(tmp / "kqs-backlog")
    try:
        empty.start()
        server.start()
        result: dict[str, Any] = {"backlog_jobs": settings.backlog_jobs}
        started = time.monotonic()
        result["fill"] = fill(settings, server)
        progress(
            f"backlog: {settings.backlog_jobs:,} delayed jobs in"
            f" {time.monotonic() - started:.1f} s (fed)"
        )
        result["memory_empty"] = memory(empty)
        result["memory_backlog"] = memory(server)
        result.update(insert_rates(settings, empty, server))
        result["insert_ratio"] = round(
            result["backlog"]["jobs_per_s"] / result["empty"]["jobs_per_s"], 3
        )
        progress(
            f"backlog: 64-client inserts/s {result['empty']['jobs_per_s']:,.0f} empty,"
            f" {result['backlog']['jobs_per_s']:,.0f} with the backlog"
        )
        result["restart"] = restart(server)
        progress(f"backlog: restart to serving {result['restart']['restart_to_serving_s']} s")
        stats = server.stats()
        result["stats_after"] = {k: stats[k] for k in ("live_jobs", "journal") if k in stats}
        return result
    finally:
        empty.stop()
        server.stop()
