"""How long and how often each workload runs: the full run and --quick."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from benchlib.procs import ROOT

WORKLOADS = ("insert", "e2e", "backlog", "large")


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    #: timed insert runs: how many per figure (the median is kept), warm-up and length
    runs: int = 3
    warmup: float = 1.0
    duration: float = 3.0
    #: load-generator processes (the machine's vCPUs; server and clients share them)
    procs: int = 2
    #: end to end: jobs per run (RQ's worker is ~50x slower, so it gets fewer)
    e2e_jobs: int = 100_000
    e2e_rq_jobs: int = 4_000
    e2e_runs: int = 3
    runner_concurrency: int = 100
    latency_seconds: float = 3.0
    #: backlog: delayed jobs pending
    backlog_jobs: int = 1_000_000
    #: large payloads: 1 MiB jobs per run
    large_jobs: int = 200
    large_runs: int = 3
    #: py-spy profiles of the kqs server (64 clients, arrays of 100)
    profile: bool = True
    profile_seconds: float = 6.0
    workloads: tuple[str, ...] = WORKLOADS
    out_dir: Path = ROOT / "bench"
    tmp_root: Path = Path(tempfile.gettempdir())

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            quick=True,
            runs=2,
            warmup=0.3,
            duration=1.0,
            e2e_jobs=10_000,
            e2e_rq_jobs=500,
            e2e_runs=1,
            latency_seconds=1.5,
            backlog_jobs=100_000,
            large_jobs=20,
            large_runs=1,
            profile=False,
            profile_seconds=3.0,
        )

    def but(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
