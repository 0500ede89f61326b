"""Runners under crashes and shutdowns: kill -9, long jobs, SIGTERM, SIGINT, and a
Jepsen-style check that every acknowledged job runs (real processes throughout)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

from tests.integration.helpers import Inserters, Params
from tests.integration.runner_handlers import Record, read_records
from tests.integration.runner_support import (
    HANDLERS,
    RunnerProcess,
    call,
    type_stats,
    wait_finished,
    wait_watching,
)
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

SLOW = f"""
[types.slow]
handler = "{HANDLERS}:slow"
concurrency = 8
[types.slow-sync]
handler = "{HANDLERS}:slow_sync"
concurrency = 8
"""


def insert(server: KqsProcess, type_: str, data: object = None, **fields: object) -> str:
    ids: list[str] = call(server, "insert", {"type": type_, "data": data, **fields})["ids"]
    return ids[0]


def events(out: Path, event: str, job_id: str | None = None) -> list[Record]:
    return [r for r in read_records(out, "slow") if r.event == event and job_id in (None, r.id)]


def test_kill_9_mid_job_runs_it_again_on_another_runner(tmp_path: Path, server: KqsProcess) -> None:
    """A killed runner's connection closes, so beanstalkd hands its job out again at once."""
    out = tmp_path / "out"
    with (
        RunnerProcess(tmp_path, SLOW, [server], out, name="a") as a,
        RunnerProcess(tmp_path, SLOW, [server], out, name="b") as b,
    ):
        wait_watching(server, "slow", runners=2)
        job_id = insert(server, "slow", {"seconds": [30, 0.2]}, ttr=2)
        wait_until(lambda: bool(events(out, "start", job_id)), what="the job started")
        (first,) = events(out, "start", job_id)
        victim, survivor = (a, b) if first.pid == a.pid else (b, a)
        victim.kill()  # SIGKILL: no release, no report
        wait_until(lambda: bool(events(out, "end", job_id)), timeout=20, what="the job ran again")
        (rerun,) = events(out, "start", job_id)[1:]
        assert rerun.pid == survivor.pid and rerun.attempt == 2
        wait_finished(server, timeout=20)
        assert call(server, "stats")["finished"] == {"done": 1, "dead": 0}
        assert survivor.stop() == 0


def test_a_long_job_is_touched_and_outlives_its_ttr_without_a_rerun(
    tmp_path: Path, server: KqsProcess
) -> None:
    out = tmp_path / "out"
    with (
        RunnerProcess(tmp_path, SLOW, [server], out, name="a") as a,
        RunnerProcess(tmp_path, SLOW, [server], out, name="b") as b,
    ):
        wait_watching(server, "slow-sync", runners=2)
        async_id = insert(server, "slow", {"seconds": 4}, ttr=1)
        sync_id = insert(server, "slow-sync", {"seconds": 4}, ttr=1)
        wait_finished(server, timeout=30)
        for job_id in (async_id, sync_id):
            assert [r.attempt for r in events(out, "start", job_id)] == [1]
            (start,) = events(out, "start", job_id)
            (end,) = events(out, "end", job_id)
            assert end.at - start.at > 3.5
        assert a.stop() == 0 and b.stop() == 0


def test_sigterm_lets_running_jobs_finish_and_releases_the_rest(
    tmp_path: Path, server: KqsProcess
) -> None:
    out = tmp_path / "out"
    runner = RunnerProcess(tmp_path, SLOW, [server], out, name="a", grace=2).start()
    try:
        wait_watching(server, "slow")
        short = [insert(server, "slow", {"seconds": 0.5}) for _ in range(3)]
        short += [insert(server, "slow-sync", {"seconds": 0.5}) for _ in range(2)]
        # long on the first attempt only: the next runner finishes them quickly
        long = [insert(server, "slow", {"seconds": [60, 0.1]}, ttr=600) for _ in range(2)]
        long += [insert(server, "slow-sync", {"seconds": [8, 0.1]}, ttr=600)]
        wait_until(lambda: len(events(out, "start")) == 8, what="every job started")
        # 5 of the 8 slots of "slow" are taken: 3 of these start, 7 wait
        queued = [insert(server, "slow", {"seconds": 0.1}) for _ in range(10)]
        wait_until(lambda: type_stats(server, "slow")["ready"] == 7, what="slots full")
        runner.signal(signal.SIGTERM)
        signalled_at = time.time()
        stopped_at = time.monotonic()
        assert runner.wait(30) == 0, runner.log_tail()
        took = time.monotonic() - stopped_at
        assert took < 8, took  # grace 2 s; a sync thread past it is not waited for
        ended = {r.id for r in events(out, "end")}
        assert set(short) <= ended  # finished within the grace period
        assert not ended & set(long)
        # nothing left reserved: the long jobs are back to ready at once, no lost job
        for type_ in ("slow", "slow-sync"):
            t = type_stats(server, type_)
            assert t["reserved"] == 0 and t["delayed"] == 0, t
        assert not [r for r in events(out, "start") if r.at > signalled_at + 0.5]
        assert call(server, "stats")["live_jobs"] == len(long) + 7
    finally:
        runner.kill()
    # another runner takes what is left, straight away
    with RunnerProcess(tmp_path, SLOW, [server], out, name="b") as b:
        wait_finished(server, timeout=30)
        assert b.stop() == 0
    ended_runs = Counter(r.id for r in events(out, "end"))
    assert ended_runs == Counter({i: 1 for i in short + long + queued})
    assert call(server, "stats")["finished"] == {"done": 18, "dead": 0}


def test_second_sigint_stops_at_once(tmp_path: Path, server: KqsProcess) -> None:
    out = tmp_path / "out"
    runner = RunnerProcess(tmp_path, SLOW, [server], out, name="a", grace=60).start()
    try:
        wait_watching(server, "slow")
        job_id = insert(server, "slow", {"seconds": [60, 0.1]}, ttr=600)
        wait_until(lambda: bool(events(out, "start", job_id)), what="started")
        runner.signal(signal.SIGINT)
        wait_until(lambda: "stopping after the running jobs" in runner.log_tail(), what="log")
        runner.signal(signal.SIGINT)
        assert runner.wait(10) == 130
        assert type_stats(server, "slow")["ready"] == 1  # released for another runner
    finally:
        runner.kill()


def ok_jobs(n: int, i: int) -> Params:
    """Singles, and every fourth call an array of 20."""
    if i % 4 == 0:
        return [{"type": "ok", "data": [n, i, k], "ttr": 2} for k in range(20)]
    return {"type": "ok", "data": [n, i], "ttr": 2}


def test_every_acknowledged_job_runs_at_least_once(tmp_path: Path) -> None:
    """Two servers, two runners on both; clients insert concurrently while one runner is
    killed with SIGKILL and replaced. After draining: no acknowledged job was lost."""
    beanstalkds = [BeanstalkdProcess(), BeanstalkdProcess()]
    servers: list[KqsProcess] = []
    runners: list[RunnerProcess] = []
    out = tmp_path / "out"
    jobs = f"""
[types.ok]
handler = "{HANDLERS}:ok_async"
concurrency = 50
"""
    try:
        for n, bs in enumerate(beanstalkds):
            bs.start()
            servers.append(KqsProcess(tmp_path / f"data{n}", beanstalkd=f"{bs.host}:{bs.port}"))
            servers[-1].start()
        runners = [
            RunnerProcess(tmp_path, jobs, servers, out, name=f"r{n}").start() for n in range(2)
        ]
        for s in servers:
            wait_watching(s, "ok", runners=2)
        total = 6000
        ports = [s.port for s in servers]
        with Inserters(ports, ok_jobs, threads=8, total=total) as inserters:
            wait_until(lambda: len(read_records(out, "ok")) > 1000, timeout=60, what="progress")
            runners[0].kill()
            runners.append(RunnerProcess(tmp_path, jobs, servers, out, name="r2").start())
        assert not inserters.errors, inserters.errors[:3]
        acked = set(inserters.acked)
        assert len(acked) == len(inserters.acked) >= total
        for s in servers:
            wait_finished(s, timeout=60)
        executed = Counter(r.id for r in read_records(out, "ok"))
        lost = acked - executed.keys()
        phantom = executed.keys() - acked
        duplicates = {i: c for i, c in executed.items() if c > 1}
        print(
            f"\nJepsen-style check: {len(acked)} acknowledged, {len(executed)} executed,"
            f" {sum(duplicates.values()) - len(duplicates)} duplicate runs"
            f" ({len(duplicates)} jobs), {len(lost)} lost"
        )
        assert not lost, sorted(lost)[:10]
        assert not phantom
        finished = sum(call(s, "stats")["finished"]["done"] for s in servers)
        assert finished == len(acked)
        for r in runners[1:]:
            assert r.stop() == 0, r.log_tail()
    finally:
        for r in runners:
            r.kill()
        for s in servers:
            s.kill()
        for bs in beanstalkds:
            bs.stop()
