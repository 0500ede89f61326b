"""Fault 8: a faulty network. Fault proxies (tests/faults/proxy.py: delays, resets and
clean closes mid-chunk, bounded black holes) sit on every path:

    clients ──proxy──► kqs ──proxy──► beanstalkd ◄──proxy── runner
                        ▲                                     │
                        └────────────────proxy────────────────┘  (hello, finish)

The runner reaches beanstalkd through the address kqs gives in `hello`, which is the
proxy in front of beanstalkd that kqs itself is configured with (`beanstalkd =
"127.0.0.1:<proxy>"`): no code change is needed to put the runner<->beanstalkd path (and
with it kqs's feeder<->beanstalkd path) behind a proxy.

Clients see successes or errors, never a wrong answer (every reply matches its request;
every acknowledged id is well formed, unique and real: it runs). Once the network heals,
everything drains: lost = acknowledged - executed = 0.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults.handlers import runs
from tests.faults.proxy import Chaos, FaultProxy
from tests.faults.support import Figures, LoadGen, sample
from tests.integration.runner_support import RunnerProcess, wait_finished, wait_watching
from tests.support import BeanstalkdProcess, KqsProcess, scaled, wait_until

JOBS = """
[types.fault]
handler = "tests.faults.handlers:record"
concurrency = 32
"""
CLIENT_CHAOS = Chaos(delay=0.2, max_delay=0.05, reset=0.01, close=0.005, stall=0.005, max_stall=2)
# the runner's kqs connection carries few, batched lines: faults must be likelier there
RUNNER_CHAOS = Chaos(delay=0.3, max_delay=0.05, reset=0.08, close=0.04, stall=0.04, max_stall=2)
BEANSTALK_CHAOS = Chaos(delay=0.1, max_delay=0.02, reset=0.003, close=0.001, stall=0.001)


def test_network_faults_on_every_path(
    tmp_path: Path, beanstalkd: BeanstalkdProcess, figures: Figures
) -> None:
    target = scaled(5000, 100_000)
    figures.scenario = "network faults on every path"
    figures.injected = (
        "proxies delaying, resetting, closing and black-holing connections: clients->kqs,"
        " kqs feeder and runner->beanstalkd, runner->kqs; 16 clients, 1 runner"
    )
    to_beanstalkd = FaultProxy((beanstalkd.host, beanstalkd.port)).start()
    server = KqsProcess(tmp_path / "data", beanstalkd=f"127.0.0.1:{to_beanstalkd.port}")
    for_clients = FaultProxy(("127.0.0.1", server.port)).start()
    for_runner = FaultProxy(("127.0.0.1", server.port)).start()
    via_proxy = KqsProcess(tmp_path / "runner-view")  # never started: the runner's --server
    via_proxy.port = for_runner.port
    out = tmp_path / "out"
    runner = RunnerProcess(tmp_path, JOBS, [via_proxy], out)
    gen = LoadGen(for_clients.port, clients=16, timeout=2.0, pause=0.002)
    proxies = {"clients": for_clients, "runner": for_runner, "beanstalkd": to_beanstalkd}
    try:
        server.start()
        runner.start()
        wait_watching(server, "fault")
        for_clients.set(CLIENT_CHAOS)
        for_runner.set(RUNNER_CHAOS)
        to_beanstalkd.set(BEANSTALK_CHAOS)
        with gen:
            for part in (1, 2, 3):  # and every open connection is reset twice on the way
                wait_until(
                    gen.reached(target * part // 3),
                    timeout=scaled(60, 600),
                    what="inserts",
                )
                if part < 3:
                    for proxy in proxies.values():
                        proxy.reset_all()
            for proxy in proxies.values():
                proxy.set(Chaos())  # the network heals
        wait_finished(server, timeout=120)
        acked = gen.snapshot()
        executed = runs(out, "fault")
        lost, _ = figures.count(acked, executed)
        for name, proxy in proxies.items():
            s = proxy.stats
            figures.note(
                f"{name}: {s['connections']} connections, {s['resets']} resets,"
                f" {s['closes']} closes, {s['stalls']} black holes, {s['delays']} delays"
            )
        unknown = gen.errors["connection"]
        figures.note(f"clients: {unknown} requests without an answer (unknown outcome)")
        assert not gen.violations, gen.violations[:3]
        assert len(set(acked)) == len(acked), "an id was acknowledged twice"
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged jobs lost: {sample(lost)}"
        for name, proxy in proxies.items():
            assert proxy.stats["resets"] + proxy.stats["closes"] > 0, f"no fault on {name}"
    finally:
        gen.stop()
        runner.kill()
        server.kill()
        for proxy in proxies.values():
            proxy.stop()
