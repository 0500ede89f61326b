"""Fault 7: MongoDB, the bulk store, goes away during large-payload traffic and comes
back. kqs uses `bulk_store = "mongodb://..."` on a mongod of the test's own. While it is
down: inserts (large ones too) are still acknowledged, small jobs keep running, large
ones wait (in kqs until their payload is stored, counted in `stats` with a `why`, or in
beanstalkd as references runners cannot fetch yet: those are retried, and use attempts,
hence the large type's max_attempts) and none runs. Once it is back, the large ones run
too: lost = 0 for both; each payload was stored once, and all are deleted at the end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import greenstalk
from pymongo import MongoClient

from tests.faults.handlers import runs
from tests.faults.support import Figures, LoadGen, all_of, sample
from tests.integration.helpers import beanstalkd_address, kqs_stats
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
PAUSE = 1  # seconds the large tube is paused before each outage


def ran_more(out: Path, type_: str, n: int) -> Callable[[], bool]:
    """A predicate: `n` more jobs of `type_` ran than now."""
    target = len(runs(out, type_)) + n
    return lambda: len(runs(out, type_)) >= target


def pause_tube(server: KqsProcess, tube: str, seconds: int) -> None:
    """Make beanstalkd hold `tube`'s jobs back from reserves for `seconds`."""
    client = greenstalk.Client(beanstalkd_address(server.port))
    try:
        client.pause_tube(tube, seconds)
    finally:
        client.close()


def large_counts(server: KqsProcess) -> dict[str, Any]:
    """beanstalkd's counts (ready, delayed, ...) of the large type's tube."""
    counts: dict[str, Any] = kqs_stats(server.port)["types"].get("large", {})
    return counts


def fetch_failed(runner: RunnerProcess) -> int:
    """How many runs the runner retried because the bulk store was unavailable."""
    log = runner.log_path.read_text(errors="replace") if runner.log_path.exists() else ""
    return log.count("bulk store unavailable")


def reference_taken(runner: RunnerProcess, out: Path) -> Callable[[], bool]:
    """A predicate: since now, the runner took a large job's reference from beanstalkd
    and failed to fetch its payload (or ran the job)."""
    failures, ran = fetch_failed(runner), len(runs(out, "large"))
    return lambda: fetch_failed(runner) > failures or len(runs(out, "large")) > ran


def gridfs_counts(url: str) -> tuple[int, int]:
    """(files, chunks) in the bulk store's GridFS bucket."""
    client: MongoClient[dict[str, Any]] = MongoClient(url)
    try:
        db = client.get_default_database()
        return db["bulk.files"].count_documents({}), db["bulk.chunks"].count_documents({})
    finally:
        client.close()


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
                # references fed before the outage wait in beanstalkd, for runners to
                # reserve once mongod is down (and fail to fetch)
                pause_tube(server, "large", PAUSE)
                wait_until(
                    lambda: large_counts(server)["ready"] >= 5,
                    timeout=30,
                    what="references ready in beanstalkd",
                )
                large_ran, taken = len(runs(out, "large")), reference_taken(runner, out)
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
                    all_of(small_ran, more_acked, taken),
                    timeout=60,
                    what="small jobs running and a reference reserved while mongod is down",
                )
                bulk = kqs_stats(server.port)["bulk"]
                assert bulk["waiting"] > 0 and bulk["why"], bulk  # large ones wait, saying why
                assert len(runs(out, "large")) == large_ran, "a large job ran, its store down"
                notes.append(f"outage {n + 1}: {bulk['waiting']} large jobs waiting in kqs")
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
        bulk = kqs_stats(server.port)["bulk"]
        assert bulk["store_available"]
        # each large job (acknowledged or not: every one ran) was stored exactly once
        assert bulk["stored"] == len(runs(out, "large")), bulk
        wait_until(lambda: gridfs_counts(url) == (0, 0), timeout=30, what="the store emptied")
    finally:
        gen.stop()
        runner.kill()
        server.kill()
        mongod.stop()
