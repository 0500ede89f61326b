"""Workload 5: 1 MiB jobs through the default bulk store (files in data_dir/bulk).

beanstalkd takes at most 65,535 bytes per job (kqs's default max_job_size), so each of
these jobs is journaled, its payload written to the bulk store, and beanstalkd carries a
small reference that the runner resolves. Measured: insert jobs/s and MiB/s with one
sequential client and with 4 concurrent clients; end to end with 1 and 2 runner
processes (jobs inserted first, then drained; rate from the handler's completion times).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib.consumers import DoneFile, KqsRunners
from benchlib.e2e import Setup, preload, throughput
from benchlib.loadgen import Load, run_load
from benchlib.procs import KqsServer
from benchlib.settings import Settings
from benchlib.stats import median
from benchlib.targets import KqsInsert

MIB = 2**20
SIZE = MIB
#: the insert-only runs use a type no runner serves, so the end-to-end runs see only theirs
INSERT_ONLY_TYPE = "bench-large-insert"
PAYLOAD_MISSING = (
    "not measured: the handler did not get the payloads (the runner does not fetch"
    " bulk-stored payloads yet)"
)


def insert(settings: Settings, server: KqsServer, clients: int) -> dict[str, Any]:
    runs = []
    for _ in range(settings.large_runs):
        load = Load(
            KqsInsert(server.port, size=SIZE, job_type=INSERT_ONLY_TYPE),
            clients=clients,
            procs=settings.procs,
            total_jobs=settings.large_jobs,
        )
        runs.append(run_load(load, [server.pid]).summary())
    rate = median([r["jobs_per_s"] for r in runs])
    return {
        "clients": clients,
        "jobs_per_s": round(rate, 1),
        "mib_per_s": round(rate * SIZE / MIB, 1),
        "ack_p50_ms": round(median([r["ack_p50_ms"] for r in runs]), 2),
        "ack_p99_ms": round(median([r["ack_p99_ms"] for r in runs]), 2),
        "runs": runs,
    }


def end_to_end(settings: Settings, server: KqsServer, tmp: Path, runners: int) -> dict[str, Any]:
    done = DoneFile(tmp / "large-done.txt")
    consumers = KqsRunners(
        server.port, runners, settings.runner_concurrency, done, tmp / "large-jobs.toml"
    )
    setup = Setup(
        f"large_{runners}",
        KqsInsert(server.port, size=SIZE, stamp=True),
        consumers,
        done,
        settings.large_jobs,
        [server.pid],
        wait_fed=lambda: server.wait_fed(120.0),
    )
    runs = []
    for _ in range(settings.large_runs):
        preload(settings, setup)
        try:
            runs.append(throughput(setup))
        finally:
            consumers.stop()
        if any(sent == 0.0 for sent, _ in done.records()):
            return {"title": consumers.title, "skipped": PAYLOAD_MISSING}
    rate = median([r["jobs_per_s"] for r in runs])
    return {
        "title": consumers.title,
        "jobs_per_s": round(rate, 1),
        "mib_per_s": round(rate * SIZE / MIB, 1),
        "runs": runs,
    }


def bulk_files(server: KqsServer) -> int:
    bulk = server.data_dir / "bulk"
    return sum(1 for p in bulk.rglob("*") if p.is_file()) if bulk.exists() else 0


def run(settings: Settings, tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    server = KqsServer(tmp / "kqs-large")
    server.start()
    try:
        result: dict[str, Any] = {"payload_bytes": SIZE, "jobs": settings.large_jobs}
        for clients in (1, 4):
            result[f"insert_{clients}"] = insert(settings, server, clients)
            progress(
                f"large: insert, {clients} client(s):"
                f" {result[f'insert_{clients}']['mib_per_s']:,.0f} MiB/s"
            )
        server.wait_fed(120.0)
        result["bulk_files_after_insert"] = bulk_files(server)
        for runners in (1, 2):
            e2e = result[f"e2e_{runners}"] = end_to_end(settings, server, tmp, runners)
            figure = e2e.get("skipped") or f"{e2e['mib_per_s']:,.0f} MiB/s"
            progress(f"large: end to end, {runners} runner(s): {figure}")
        return result
    finally:
        server.stop()
