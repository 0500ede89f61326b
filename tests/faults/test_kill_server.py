"""Fault 1: `kill -9` of the kqs server, again and again, while 64 clients insert at full
speed and runners execute the jobs. After a full drain: every acknowledged job ran at
least once (lost = acknowledged - executed = 0); duplicate runs are counted."""

from __future__ import annotations

import random
from pathlib import Path

from tests.faults.handlers import runs
from tests.faults.support import Figures, LoadGen, sample
from tests.integration.runner_support import RunnerProcess, call, wait_finished, wait_watching
from tests.support import SOAK, KqsProcess, scaled, wait_until

JOBS = """
[types.fault]
handler = "tests.faults.handlers:record"
concurrency = 64
"""


def test_kill_9_server_repeatedly_during_heavy_inserts(tmp_path: Path, figures: Figures) -> None:
    rounds = scaled(5, 40)
    clients = scaled(64, 128)
    rng = random.Random()
    figures.scenario = "kill -9 kqs during heavy inserts"
    figures.injected = f"SIGKILL of kqs (and so its embedded beanstalkd), {rounds} rounds"
    figures.injected += f", {clients} concurrent clients, 2 runners"
    # small segments: rotation, retirement and compaction all happen between the kills
    server = KqsProcess(tmp_path / "data", segment_bytes=256 * 1024)
    out = tmp_path / "out"
    runners = [RunnerProcess(tmp_path, JOBS, [server], out, name=f"r{n}") for n in range(2)]
    gen = LoadGen(server.port, clients=clients)
    try:
        server.start()
        for r in runners:
            r.start()
        wait_watching(server, "fault", runners=2)
        with gen:
            for _ in range(rounds):
                target = gen.count() + rng.randint(1000, 4000 if SOAK else 2500)
                wait_until(gen.reached(target), timeout=60, what="inserts")
                server.kill()  # mid-burst: many inserts are in flight, unanswered
                server.start()
            wait_until(gen.more(500), timeout=60, what="inserts")
        wait_finished(server, timeout=scaled(90, 300))
        acked = gen.snapshot()
        executed = runs(out, "fault")
        lost, _ = figures.count(acked, executed)
        cut = gen.errors["connection"]
        phantom = len(executed.keys() - set(acked))
        figures.note(f"{cut} requests cut by the kills; {phantom} of their jobs ran (unacked)")
        assert not gen.violations, gen.violations[:3]
        assert len(set(acked)) == len(acked), "an id was acknowledged twice"
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged jobs lost: {sample(lost)}"
        assert len(acked) >= rounds * 1000
        stats = call(server, "stats")
        assert stats["live_jobs"] == 0 and stats["dead_jobs"] == 0, stats
    finally:
        gen.stop()
        for r in runners:
            r.kill()
        server.kill()
