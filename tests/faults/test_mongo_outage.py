"""Fault 7: MongoDB, the bulk store, goes away during large-payload traffic and comes
back. kqs uses `bulk_store = "mongodb://..."` on a mongod of the test's own. While it is
down: inserts (large ones too) are still acknowledged, small jobs keep running, large
ones wait (in kqs until their payload is stored, or in beanstalkd as references runners
cannot fetch yet). Once it is back, the large ones run too: lost = 0 for both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.handlers import runs
from tests.faults.support import Figures, LoadGen, all_of, sample
from tests.integration.helpers import kqs_stats
from tests.integration.runner_support import RunnerProcess, wait_finished, wait_watching
from tests.mongo import MongodProcess, unique_database
from tests.support import KqsProcess, scaled, wait_until

JOBS = """
[types.small]
handler = "tests.faults.handlers:record"
concurrency = 32
[types.large]
handler = "tests.faults.handlers:record"
concurrency = 8
retry = { max_attempts = 1000, backoff = "constant", base = 1 }
"""
LARGE = 100_000  # bytes of payload: well over beanstalkd's 65535


def ran_more(out: Path, type_: str, n: int) -> Callable[[], bool]:
    """A predicate: `n` more jobs of `type_` ran than now."""
    target = len(runs(out, type_)) + n
    return lambda: len(runs(out, type_)) >= target


def job(client: int, seq: int) -> dict[str, Any]:
    if (seq // 1000 + seq % 1000) % 4 == 0:
        return {"type": "large", "data": {"c": client, "s": seq, "blob": "L" * LARGE}}
    return {"type": "small", "data": {"c": client, "s": seq}}


def test_mongod_stopped_and_restarted_during_large_payloads(
    tmp_path: Path, figures: Figures
) -> None:
    outages = scaled(1, 4)
    figures.scenario = "MongoDB bulk store down and back"
    figures.injected = f"mongod stopped (SIGTERM, then SIGKILL in soak) and restarted x{outages}"
    figures.injected += "; 1 large (100 kB) job in 4; 4 clients, 1 runner"
    mongod = MongodProcess(tmp_path / "mongo" / "db")
    mongod.start()
    url = mongod.url(unique_database(), serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
    server = KqsProcess(tmp_path / "data", bulk_store=url)
    out = tmp_path / "out"
    runner = RunnerProcess(tmp_path, JOBS, [server], out)
    gen = LoadGen(server.port, clients=4, job=job, pause=0.02, batch=4)
    notes: list[str] = []
    try:
        server.start()
        runner.start()
        wait_watching(server, "small")
        with gen:
            for n in range(outages):
                wait_until(ran_more(out, "large", 20), timeout=60, what="large jobs running")
                if n % 2 == 0:
                    mongod.stop()
                else:
                    mongod.kill()
                small_ran, more_acked = ran_more(out, "small", 200), gen.more(300)
                wait_until(
                    lambda: not kqs_stats(server.port)["bulk"]["store_available"],
                    timeout=30,
                    what="kqs sees the store down",
                )
                wait_until(  # small jobs keep running, inserts keep being acknowledged
                    all_of(small_ran, more_acked),
                    timeout=60,
                    what="small jobs running while mongod is down",
                )
                waiting = kqs_stats(server.port)["bulk"]["waiting"]
                notes.append(f"outage {n + 1}: {waiting} large jobs waiting in kqs")
                mongod.start()
            wait_until(gen.reached(2000), timeout=60, what="inserts")
        wait_finished(server, timeout=scaled(90, 240))
        acked_ids = gen.snapshot()
        executed = runs(out, "small") + runs(out, "large")
        lost, _ = figures.count(acked_ids, executed)
        large = [i for i in acked_ids if i in runs(out, "large")]
        figures.notes += [*notes, f"{len(large)} large jobs ran"]
        assert not gen.violations, gen.violations[:3]
        assert not lost, f"{len(lost)} of {len(acked_ids)} acknowledged jobs lost: {sample(lost)}"
        assert kqs_stats(server.port)["bulk"]["store_available"]
    finally:
        gen.stop()
        runner.kill()
        server.kill()
        mongod.stop()
