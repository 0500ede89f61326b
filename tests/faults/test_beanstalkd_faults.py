"""Fault 5: the embedded beanstalkd is killed (kqs restarts it), put into drain mode
(SIGUSR1: it refuses every put) and then stopped, and killed with its binlog deleted,
while clients insert and a runner runs the jobs. Every acknowledged job is fed again as
needed and runs: lost = acknowledged - executed = 0."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tests.faults.handlers import runs
from tests.faults.support import Figures, LoadGen, sample
from tests.integration.helpers import kqs_stats
from tests.integration.runner_support import RunnerProcess, wait_finished, wait_watching
from tests.support import KqsProcess, scaled, wait_until

JOBS = """
[types.fault]
handler = "tests.faults.handlers:record"
concurrency = 64
"""


def job(client: int, seq: int) -> dict[str, Any]:
    """Mostly immediate jobs; every 7th is delayed a second (its due time must hold)."""
    return {"type": "fault", "data": {"c": client, "s": seq}, "delay": 1 if seq % 7 == 0 else 0}


def beanstalkd(server: KqsProcess) -> dict[str, Any]:
    info: dict[str, Any] = kqs_stats(server.port)["beanstalkd"]
    return info


def put_retries_above(server: KqsProcess, n: int) -> bool:
    return bool(kqs_stats(server.port)["feeder"]["put_retries"] > n)


def wait_new_beanstalkd(server: KqsProcess, old_pid: int) -> None:
    def back() -> bool:
        b = beanstalkd(server)
        return bool(b["pid"] not in (None, old_pid) and b["reachable"])

    wait_until(back, timeout=60, what="embedded beanstalkd restarted")


def test_beanstalkd_killed_drained_and_binlog_deleted(tmp_path: Path, figures: Figures) -> None:
    cycles = scaled(2, 3)
    figures.scenario = "beanstalkd killed / drained / binlog lost"
    figures.injected = (
        f"{cycles}x: SIGKILL of beanstalkd; SIGUSR1 (drain mode) then SIGTERM;"
        " SIGKILL with the binlog deleted; 16 clients, 1 runner"
    )
    server = KqsProcess(tmp_path / "data")
    out = tmp_path / "out"
    binlog = tmp_path / "data" / "beanstalkd"
    runner = RunnerProcess(tmp_path, JOBS, [server], out)
    gen = LoadGen(server.port, clients=16, job=job, pause=0.02)
    try:
        server.start()
        runner.start()
        wait_watching(server, "fault")
        with gen:

            def progress(n: int = 300) -> Callable[[], bool]:
                acked, ran = gen.count(), sum(runs(out, "fault").values())
                return lambda: gen.count() >= acked + n and sum(runs(out, "fault").values()) > ran

            for _ in range(cycles):
                wait_until(progress(), timeout=30, what="jobs flowing")
                pid = beanstalkd(server)["pid"]
                os.kill(pid, signal.SIGKILL)
                wait_new_beanstalkd(server, pid)

                wait_until(progress(), timeout=30, what="jobs flowing after the kill")
                pid = beanstalkd(server)["pid"]
                retries = kqs_stats(server.port)["feeder"]["put_retries"]
                os.kill(pid, signal.SIGUSR1)  # drain mode: every put is refused
                wait_until(
                    partial(put_retries_above, server, retries),
                    timeout=30,
                    what="puts refused by the draining beanstalkd",
                )
                wait_until(gen.more(200), what="inserts acked anyway")
                os.kill(pid, signal.SIGTERM)  # it stops; kqs starts it again, not draining
                wait_new_beanstalkd(server, pid)

                wait_until(progress(), timeout=30, what="jobs flowing after the drain")
                pid = beanstalkd(server)["pid"]
                os.kill(pid, signal.SIGSTOP)  # frozen while its binlog goes
                shutil.rmtree(binlog)
                os.kill(pid, signal.SIGKILL)
                wait_new_beanstalkd(server, pid)
            wait_until(progress(), timeout=30, what="jobs flowing after the binlog loss")
        wait_finished(server, timeout=scaled(60, 180))
        acked_ids = gen.snapshot()
        executed = runs(out, "fault")
        lost, _ = figures.count(acked_ids, executed)
        stats = kqs_stats(server.port)
        figures.note(
            f"feeder: {stats['feeder']['refed']} re-fed after beanstalkd lost them,"
            f" {stats['feeder']['put_retries']} puts refused while draining"
        )
        assert not gen.violations, gen.violations[:3]
        assert not lost, f"{len(lost)} of {len(acked_ids)} acknowledged jobs lost: {sample(lost)}"
        assert stats["feeder"]["refed"] > 0
        assert beanstalkd(server)["restarts"] >= 3 * cycles
    finally:
        gen.stop()
        runner.kill()
        server.kill()
