"""Fault 6: runners die and handlers misbehave. While clients keep inserting ordinary jobs:

- runners are killed with SIGKILL in the middle of jobs (slow ones are running);
- a Python handler hangs past its timeout, and a command hangs past its TTR (the
  command's default time limit), on their first attempt;
- poison jobs: a handler that always raises, a command that SIGKILLs itself, and a
  Python handler that SIGKILLs its own runner process (every runner taking it dies).

A supervisor starts a new runner whenever one is dead. After the drain: every job that
can complete ran at least once (lost = 0), the hung ones ran again, every poison job is
dead (kept, listed by `dead`), and nothing else is.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kqs.client import Client
from kqs.runner import JobContext
from kqs.runner import command as runner_command
from kqs.runner.command import CommandHandler
from tests.faults.handlers import runs
from tests.faults.support import Figures, LoadGen, sample
from tests.integration.runner_support import RunnerProcess, call, wait_watching
from tests.support import KqsProcess, scaled, wait_until

H = "tests.faults.handlers"
HANG_CMD = (
    'if [ "$KQS_ATTEMPT" = 1 ]; then exec sleep 60; fi;'
    ' echo "$KQS_JOB_ID $KQS_ATTEMPT $$" >> "$KQS_TEST_OUT/hang-cmd.log"'
)
JOBS = f"""
[types.fault]
handler = "{H}:record"
concurrency = 16
[types.slow]
handler = "{H}:slow_record"
concurrency = 16
[types.hang]
handler = "{H}:hang_first"
timeout = 1
retry = {{ max_attempts = 20, backoff = "constant", base = 0 }}
[types.hang-cmd]
command = ["sh", "-c", '{HANG_CMD}']
retry = {{ max_attempts = 20, backoff = "constant", base = 0 }}
[types.poison]
handler = "{H}:poison"
retry = {{ max_attempts = 3, backoff = "constant", base = 0 }}
[types.kill-self]
command = ["sh", "-c", "kill -9 $$"]
retry = {{ max_attempts = 3, backoff = "constant", base = 0 }}
[types.kill-runner]
handler = "{H}:kill_runner"
retry = {{ max_attempts = 2, backoff = "constant", base = 0 }}
"""
POISON = ("poison", "kill-self", "kill-runner")


def mixed(client: int, seq: int) -> dict[str, Any]:
    """Ordinary jobs, every 4th a slow one (0.3 s): a killed runner always has some running."""
    if (seq // 1000 + seq % 1000) % 4 == 0:
        return {"type": "slow", "data": {"c": client, "s": 0.3}}
    return {"type": "fault", "data": {"c": client, "s": seq}}


MAX_RUNNERS = 60


class Supervisor:
    """Keeps `n` runner processes alive (at most MAX_RUNNERS started in all)."""

    def __init__(self, tmp_path: Path, server: KqsProcess, out: Path, n: int) -> None:
        self.tmp_path, self.server, self.out = tmp_path, server, out
        self.runners: list[RunnerProcess] = []
        self.started = 0
        self.deaths = 0
        self.n = n

    def tend(self) -> None:
        """Replace dead runners."""
        alive = [r for r in self.runners if r.alive()]
        self.deaths += len([r for r in self.runners if not r.alive()])
        self.runners = alive
        while len(self.runners) < self.n:
            assert self.started < MAX_RUNNERS, "runners keep dying"
            name = f"r{self.started}"
            self.started += 1
            self.runners.append(
                RunnerProcess(self.tmp_path, JOBS, [self.server], self.out, name=name)
            )
            self.runners[-1].start()

    def tending(self, predicate: Callable[[], bool]) -> Callable[[], bool]:
        """`predicate`, replacing dead runners each time it is asked."""

        def check() -> bool:
            self.tend()
            return predicate()

        return check

    def kill_one(self, rng: random.Random) -> None:
        alive = [r for r in self.runners if r.alive()]
        if alive:
            rng.choice(alive).kill()

    def stop(self) -> None:
        for r in self.runners:
            r.kill()


def test_runners_killed_hanging_and_poison_handlers(tmp_path: Path, figures: Figures) -> None:
    kills = scaled(3, 30)
    rng = random.Random()
    figures.scenario = "runner kill -9, hung and poison handlers"
    figures.injected = (
        f"SIGKILL of a runner mid-job x{kills}; handler hung past timeout / command past TTR;"
        " poison: raising, SIGKILLing its command, SIGKILLing its runner"
    )
    server = KqsProcess(tmp_path / "data")
    out = tmp_path / "out"
    pool = Supervisor(tmp_path, server, out, n=2)
    gen = LoadGen(server.port, clients=4, job=mixed, pause=0.01)
    try:
        server.start()
        pool.tend()
        wait_watching(server, "fault", runners=2)
        with Client("127.0.0.1", server.port) as c:
            slow = c.call("insert", [{"type": "slow", "data": {"s": 0.5}} for _ in range(60)])
            hang = c.call("insert", [{"type": "hang", "data": n} for n in range(3)])
            hang_cmd = c.call(
                "insert", [{"type": "hang-cmd", "data": n, "ttr": 1} for n in range(3)]
            )
            # ttr 3: a job a runner loses track of is back within seconds, not 30 s
            poison = {
                t: c.call("insert", [{"type": t, "data": n, "ttr": 3} for n in range(2)])["ids"]
                for t in POISON
            }
        with gen:
            for _ in range(kills):
                ran = sum(runs(out, "slow").values()) + sum(runs(out, "fault").values())

                def progress(ran: int = ran) -> bool:
                    pool.tend()
                    done = sum(runs(out, "slow").values()) + sum(runs(out, "fault").values())
                    return done >= ran + 20

                wait_until(progress, timeout=30, what="jobs running")
                pool.kill_one(rng)  # slow jobs are in flight in it
            wait_until(pool.tending(gen.reached(500)), timeout=30, what="inserts")

        def drained() -> bool:
            pool.tend()
            stats = call(server, "stats")
            return bool(stats["live_jobs"] == 0 and stats["pending"] == 0)

        wait_until(drained, timeout=scaled(90, 240), what="every live job finished")

        completing = {
            "fault+slow": gen.snapshot() + slow["ids"],
            "hang": hang["ids"],
            "hang-cmd": hang_cmd["ids"],
        }
        executed: Counter[str] = Counter()
        for type_ in ("fault", "slow", "hang", "hang-cmd"):
            executed.update(runs(out, type_))
        acked = [i for ids in completing.values() for i in ids]
        lost, _ = figures.count(acked, executed)
        dead = call(server, "dead", {"limit": 1000})["jobs"]
        unexpected = sum(
            p.read_text(errors="replace").count("unexpected error") for p in tmp_path.glob("r*.log")
        )
        figures.note(
            f"{pool.deaths} runner deaths ({kills} by the test), {len(dead)} poison jobs dead;"
            " acknowledged counts jobs that can complete"
        )
        assert not gen.violations, gen.violations[:3]
        assert not lost, f"{len(lost)} of {len(acked)} jobs never ran: {sample(lost)}"
        for type_ in ("hang", "hang-cmd"):  # the hung first attempt was given up, then re-run
            lines = (out / f"{type_}.log").read_text().splitlines()
            attempts = {(line.split()[0], int(line.split()[1])) for line in lines}
            assert {i for i, _ in attempts} == set(completing[type_]), (type_, attempts)
            assert min(a for _, a in attempts) >= 2, (type_, attempts)
        assert {j["id"] for j in dead} == {i for ids in poison.values() for i in ids}, dead
        by_id = {j["id"]: j for j in dead}
        for type_, ids in poison.items():
            for job_id in ids:
                assert by_id[job_id]["type"] == type_
        assert pool.deaths >= kills + 2, "kill-runner jobs did not kill their runners"
        assert unexpected == 0, "the runners logged 'unexpected error' (a runner bug)"
    finally:
        gen.stop()
        pool.stop()
        server.kill()


async def _no_touch() -> bool:
    return True


@pytest.mark.parametrize(("script", "kind"), [("exit 0", "done"), ("kill -9 $$", "retry")])
def test_a_command_gone_before_its_stdin_is_written_still_has_an_outcome(
    monkeypatch: pytest.MonkeyPatch, script: str, kind: str
) -> None:
    """A busy runner may write a job to a command's stdin after the command ended
    without reading it (it exited, or killed itself): that is an outcome, not a crash.
    (On uvloop, `kqs run`'s loop, the write used to raise RuntimeError, and the job was
    left reserved until its TTR.)"""
    uvloop = pytest.importorskip("uvloop")
    write_stdin = runner_command._write_stdin

    async def late(stream: asyncio.StreamWriter | None, data: bytes) -> None:
        await asyncio.sleep(0.3)  # the runner was busy: the program is gone already
        await write_stdin(stream, data)

    monkeypatch.setattr(runner_command, "_write_stdin", late)
    handler = CommandHandler(("sh", "-c", script), 100)
    job = JobContext("n1-00000000000000001", "t", None, 1, 10, _no_touch)
    outcome = uvloop.run(handler.run(job, {"id": job.id}, None))
    assert outcome.kind == kind
