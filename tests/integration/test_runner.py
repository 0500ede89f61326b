"""`kqs run` against real kqs servers and beanstalkd: success, retries, dead jobs, commands.

Runners are child processes; their handlers (tests/integration/runner_handlers.py) write
what they did to files, which the tests read.
"""

from __future__ import annotations

import base64
import itertools
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import greenstalk
import orjson
import pytest

from kqs.client import RemoteError
from tests.integration.helpers import kqs_cli
from tests.integration.runner_handlers import read_records
from tests.integration.runner_support import (
    HANDLERS,
    RunnerProcess,
    call,
    type_stats,
    wait_finished,
    wait_watching,
)
from tests.support import BeanstalkdProcess, KqsProcess, wait_until


def insert(server: KqsProcess, type_: str, data: object = None, **fields: object) -> str:
    ids: list[str] = call(server, "insert", {"type": type_, "data": data, **fields})["ids"]
    return ids[0]


def insert_many(server: KqsProcess, type_: str, data: list[object]) -> list[str]:
    """One insert call of one job per item of `data`."""
    ids: list[str] = call(server, "insert", [{"type": type_, "data": d} for d in data])["ids"]
    return ids


def dead_ids(server: KqsProcess) -> set[str]:
    return {j["id"] for j in call(server, "dead", {})["jobs"]}


def test_a_successful_job_runs_exactly_once_and_is_retired(
    tmp_path: Path, server: KqsProcess
) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.ok]
handler = "{HANDLERS}:ok"
[types.ok-async]
handler = "{HANDLERS}:ok_async"
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "ok")
        wait_watching(server, "ok-async")
        ids = [insert(server, "ok", {"n": n}) for n in range(20)]
        ids += [insert(server, "ok-async", {"n": n}) for n in range(20)]
        wait_finished(server, timeout=30)
        stats = call(server, "stats")
        assert stats["live_jobs"] == 0 and stats["dead_jobs"] == 0
        assert stats["finished"] == {"done": 40, "dead": 0}
        assert stats["types"]["ok"]["done"] == 20
        for type_ in ("ok", "ok-async"):  # deleted from beanstalkd: nothing can run again

            def empty(type_: str = type_) -> bool:
                t = type_stats(server, type_)
                return (t["ready"], t["reserved"], t["delayed"], t["buried"]) == (0, 0, 0, 0)

            wait_until(empty, what=f"{type_} deleted from beanstalkd")
        assert runner.stop() == 0, runner.log_tail()
    runs = Counter(r.id for r in read_records(out, "ok"))
    assert runs == Counter({i: 1 for i in ids})
    assert {r.attempt for r in read_records(out, "ok")} == {1}


def test_a_failing_job_is_retried_with_growing_delays(tmp_path: Path, server: KqsProcess) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.flaky]
handler = "{HANDLERS}:flaky"
retry = {{ max_attempts = 5, base = 1, factor = 2, jitter = 0 }}
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "flaky")
        job_id = insert(server, "flaky", {"fail": 2})
        wait_finished(server, timeout=30)
        assert runner.stop() == 0
    runs = read_records(out, "flaky")
    assert [(r.id, r.attempt) for r in runs] == [(job_id, 1), (job_id, 2), (job_id, 3)]
    first_gap, second_gap = runs[1].at - runs[0].at, runs[2].at - runs[1].at
    assert 0.9 < first_gap < 1.8, first_gap  # base 1 s
    assert 1.9 < second_gap < 3.0, second_gap  # then 2 s
    assert call(server, "stats")["finished"] == {"done": 1, "dead": 0}


def test_poison_job_goes_dead_and_retry_brings_it_back(tmp_path: Path, server: KqsProcess) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.poison]
handler = "{HANDLERS}:poison"
retry = {{ max_attempts = 3, backoff = "constant", base = 2, jitter = 0 }}
[types.hopeless]
handler = "{HANDLERS}:hopeless"
[types.ok]
handler = "{HANDLERS}:ok"
"""
    address = f"127.0.0.1:{server.port}"
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "ok")
        poison_id = insert(server, "poison", "pill")
        hopeless_id = insert(server, "hopeless")
        wait_until(lambda: bool(read_records(out, "poison")), what="the poison job's first run")
        ok_ids = insert_many(server, "ok", list(range(50)))
        wait_until(lambda: type_stats(server, "ok").get("done") == 50, what="the ok jobs done")
        # other jobs flowed while the poison job was still being retried
        assert poison_id not in dead_ids(server)
        assert len(read_records(out, "poison")) < 3
        wait_until(
            lambda: (
                call(server, "stats")["dead_jobs"] == 2 and call(server, "stats")["live_jobs"] == 0
            ),
            timeout=30,
            what="two dead jobs, nothing live",
        )
        assert Counter(r.id for r in read_records(out, "ok")) == Counter({i: 1 for i in ok_ids})
        poison_runs = read_records(out, "poison")
        assert [r.attempt for r in poison_runs] == [1, 2, 3]
        assert all(b.at - a.at > 1.9 for a, b in itertools.pairwise(poison_runs))
        assert [r.attempt for r in read_records(out, "hopeless")] == [1]  # Fail: no retry

        listed = orjson.loads(
            kqs_cli("dead", "list", "--type", "poison", "--server", address).stdout
        )
        assert [j["id"] for j in listed["jobs"]] == [poison_id]
        dead = listed["jobs"][0]
        assert dead["attempts"] == 3 and dead["data"] == "pill"
        assert dead["error"] == "ValueError: poison pill pill"
        everything = call(server, "dead", {})
        assert {j["id"]: j["attempts"] for j in everything["jobs"]} == {
            poison_id: 3,
            hopeless_id: 1,
        }
        assert "Fail: cannot ever work" in {j["error"] for j in everything["jobs"]}
        wait_until(lambda: type_stats(server, "poison")["buried"] == 1, what="buried")

        # retry: fed again with attempts reset, runs three more times, dead again
        retried = kqs_cli("dead", "retry", poison_id, "--server", address)
        assert retried.returncode == 0, retried.stderr
        assert orjson.loads(retried.stdout) == {"retried": 1}
        wait_until(
            lambda: (
                len(read_records(out, "poison")) == 6 and call(server, "stats")["dead_jobs"] == 2
            ),
            timeout=30,
            what="the retried poison job dead again",
        )
        assert [r.attempt for r in read_records(out, "poison")] == [1, 2, 3, 1, 2, 3]
        wait_until(lambda: type_stats(server, "poison")["buried"] == 1, what="one buried copy")

        usage = kqs_cli("dead", "purge", "--server", address)
        assert usage.returncode != 0 and "exactly one of" in usage.stderr
        purged = kqs_cli("dead", "purge", "--all", "--server", address)
        assert orjson.loads(purged.stdout) == {"purged": 2}
        assert call(server, "dead", {})["jobs"] == []
        assert runner.stop() == 0


def test_dead_retry_by_type_runs_the_job_again(tmp_path: Path, server: KqsProcess) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.flaky]
handler = "{HANDLERS}:flaky"
retry = {{ max_attempts = 2, backoff = "constant", base = 0 }}
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "flaky")
        job_id = insert(server, "flaky", {"fail": 2})  # fails attempts 1 and 2: dead
        wait_until(lambda: call(server, "stats")["dead_jobs"] == 1, timeout=30, what="dead")
        with pytest.raises(RemoteError) as err:
            call(server, "retry", {"id": "nope-1"})
        assert err.value.code == "not_found"
        # attempts restart at 1 and it still fails twice: dead again
        assert call(server, "retry", {"type": "flaky"}) == {"retried": 1}
        wait_until(lambda: len(read_records(out, "flaky")) == 4, timeout=30, what="4 runs")
        wait_until(lambda: call(server, "stats")["dead_jobs"] == 1, timeout=30, what="dead")
        assert [(r.id, r.attempt) for r in read_records(out, "flaky")] == [
            (job_id, 1),
            (job_id, 2),
            (job_id, 1),
            (job_id, 2),
        ]
        assert runner.stop() == 0


def test_command_handler(tmp_path: Path, server: KqsProcess) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.cmd]
command = ["{sys.executable}", "-m", "{HANDLERS}"]
retry = {{ max_attempts = 4, backoff = "constant", base = 0 }}
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "cmd")
        done_id = insert(server, "cmd", {"exit": 0, "text": "héllo"}, prio="high", ttr=40)
        retry_id = insert(server, "cmd", {"exit": [3, 7, 0]})
        dead_id = insert(server, "cmd", {"exit": 100})
        wait_until(lambda: call(server, "stats")["live_jobs"] == 0, timeout=30, what="all finished")
        assert runner.stop() == 0
    runs = Counter((r.id, r.attempt) for r in read_records(out, "command"))
    assert runs == Counter(
        {(done_id, 1): 1, (retry_id, 1): 1, (retry_id, 2): 1, (retry_id, 3): 1, (dead_id, 1): 1}
    )
    stdin = orjson.loads((out / f"stdin-{done_id}-1.json").read_bytes())
    assert stdin["id"] == done_id and stdin["type"] == "cmd" and stdin["attempt"] == 1
    assert stdin["data"] == {"exit": 0, "text": "héllo"}
    assert stdin["prio"] == 9000 and stdin["ttr"] == 40 and stdin["delay"] == 0
    stats = call(server, "stats")
    assert stats["finished"] == {"done": 2, "dead": 1}
    (dead,) = call(server, "dead", {})["jobs"]
    assert dead["id"] == dead_id and dead["attempts"] == 1
    assert dead["error"] == "exit code 100: command failing with 100 on attempt 1"


def test_bad_jobs_file_is_a_clear_error(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[types.t]\ncommand = ["x"]\ntimeout = -1\n')
    out = kqs_cli("run", "--jobs", str(jobs))
    assert out.returncode != 0 and "types.t.timeout" in out.stderr
    jobs.write_text('[types.t]\nhandler = "no_such_module_kqs:f"\n')
    out = kqs_cli("run", "--jobs", str(jobs), "--server", "127.0.0.1:1")
    assert out.returncode != 0 and "types.t.handler: cannot import" in out.stderr


def test_token_auth_and_idle_connections(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> None:
    """With an auth_token the runner authenticates each connection; the server closing an
    idle connection costs nothing (the next report opens another)."""
    token = "runner-test-token-0123456789"
    kqs = KqsProcess(
        tmp_path / "data",
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
        auth_token=token,
        idle_timeout=1,
    )
    kqs.start()
    out = tmp_path / "out"
    jobs = f'[types.ok]\nhandler = "{HANDLERS}:ok"\n'
    try:
        with RunnerProcess(tmp_path, jobs, [kqs], out, args=("--token", token)) as runner:

            def stats() -> dict[str, Any]:
                result: dict[str, Any] = call(kqs, "stats", token=token)
                return result

            def insert_ok(n: int) -> str:
                ids: list[str] = call(kqs, "insert", {"type": "ok", "data": n}, token=token)["ids"]
                return ids[0]

            wait_until(lambda: stats()["types"].get("ok", {}).get("runners", 0) >= 1, what="runner")
            first = insert_ok(1)
            wait_until(lambda: stats()["finished"]["done"] == 1, what="first job done")
            time.sleep(1.5)  # longer than idle_timeout: the server closes the report connection
            second = insert_ok(2)
            wait_until(lambda: stats()["finished"]["done"] == 2, what="second job done")
            assert stats()["live_jobs"] == 0
            assert runner.stop() == 0, runner.log_tail()
        assert {r.id for r in read_records(out, "ok")} == {first, second}
        with pytest.raises(RemoteError) as err:
            call(kqs, "stats")
        assert err.value.code == "unauthorized"
    finally:
        kqs.kill()


def test_large_payloads_come_from_the_bulk_store_and_base64_becomes_bytes(
    tmp_path: Path, server: KqsProcess
) -> None:
    out = tmp_path / "out"
    jobs = f'[types.big]\nhandler = "{HANDLERS}:inspect"\n'
    blob = base64.b64encode(bytes(range(256)) * 4).decode()
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "big")
        small = insert(server, "big", {"text": "x", "blob": {"$base64": blob}})
        large = insert(server, "big", {"text": "y" * 200_000, "blob": {"$base64": blob}})
        wait_finished(server, timeout=30)
        assert call(server, "stats")["bulk"]["stored"] == 1  # the large one went that way
        assert runner.stop() == 0, runner.log_tail()
    assert {r.id: r.event for r in read_records(out, "inspect")} == {
        small: "1:bytes:1024",
        large: "200000:bytes:1024",
    }


def test_a_hung_sync_handler_holds_its_own_type_back_only(
    tmp_path: Path, server: KqsProcess
) -> None:
    """A sync handler past its timeout keeps its thread, and one of its type's slots,
    until it returns: the rest of its type waits; other types run at once, on threads of
    their own (a job never waits for a thread, its timeout running)."""
    out = tmp_path / "out"
    jobs = f"""
[types.hang]
handler = "{HANDLERS}:slow_sync"
concurrency = 1
timeout = 0.3
retry = {{ base = 600 }}
[types.ok]
handler = "{HANDLERS}:ok"
concurrency = 1
timeout = 1
retry = {{ backoff = "constant", base = 1, jitter = 0 }}
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "hang")
        wait_watching(server, "ok")
        insert_many(server, "hang", [{"seconds": 3}, {"seconds": 3}])
        wait_until(lambda: bool(read_records(out, "slow")), what="a hang job started")
        time.sleep(0.8)  # the first run has timed out; its thread sleeps on
        ok_id = insert(server, "ok", 1)
        wait_until(lambda: type_stats(server, "ok").get("done") == 1, timeout=30, what="ok done")
        assert [(r.id, r.attempt) for r in read_records(out, "ok")] == [(ok_id, 1)]

        def starts() -> list[Any]:
            return [r for r in read_records(out, "slow") if r.event == "start"]

        wait_until(lambda: len(starts()) == 2, timeout=10, what="the second hang job started")
        first, second = starts()
        (first_end,) = [r for r in read_records(out, "slow") if r.event == "end"]
        assert first_end.id == first.id and second.at >= first_end.at
        assert runner.alive()
        assert runner.stop() == 0, runner.log_tail()
    assert "its thread keeps one of the type's slots" in runner.log_tail(100_000)


def test_a_handler_raising_keyboard_interrupt_is_retried(
    tmp_path: Path, server: KqsProcess
) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.interrupted]
handler = "{HANDLERS}:interrupted"
retry = {{ backoff = "constant", base = 0 }}
[types.interrupted-async]
handler = "{HANDLERS}:interrupted_async"
retry = {{ backoff = "constant", base = 0 }}
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "interrupted")
        wait_watching(server, "interrupted-async")
        ids = [insert(server, "interrupted"), insert(server, "interrupted-async")]
        wait_finished(server, timeout=20)
        assert runner.alive()
        assert runner.stop() == 0, runner.log_tail()
    runs = Counter((r.id, r.attempt) for r in read_records(out, "interrupted"))
    assert runs == Counter({(i, n): 1 for i in ids for n in (1, 2)})
    assert call(server, "stats")["finished"] == {"done": 2, "dead": 0}
    assert "KeyboardInterrupt: interrupted in the handler" in runner.log_tail(100_000)


def test_a_runner_stopped_by_an_escaping_interrupt_exits_despite_a_hung_thread(
    tmp_path: Path, server: KqsProcess
) -> None:
    """KeyboardInterrupt raised in a task a handler awaits leaves asyncio's loop (it
    cannot be caught around the handler): the runner stops, and does not wait at exit for
    a sync handler's thread that will not return for a long while."""
    out = tmp_path / "out"
    jobs = f"""
[types.hang]
handler = "{HANDLERS}:slow_sync"
timeout = 0.3
retry = {{ base = 600 }}
[types.boom]
handler = "{HANDLERS}:interrupted_in_a_task"
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "hang")
        wait_watching(server, "boom")
        insert(server, "hang", {"seconds": 60})
        wait_until(
            lambda: "its thread keeps one of the type's slots" in runner.log_tail(100_000),
            what="the hang job given up on",
        )
        boom = insert(server, "boom")
        assert runner.wait(timeout=20) == 130
        assert [r.id for r in read_records(out, "interrupted")] == [boom]
    assert "stopped by KeyboardInterrupt" in runner.log_tail(100_000)


def test_handlers_touch_their_jobs(
    tmp_path: Path, beanstalkd: BeanstalkdProcess, server: KqsProcess
) -> None:
    """`job.touch_sync()` (sync handlers) and `await job.touch()` (async ones) reach
    beanstalkd: with a TTR of 100 s the runner touches nothing of its own meanwhile."""
    out = tmp_path / "out"
    jobs = f"""
[types.touch]
handler = "{HANDLERS}:touching"
[types.touch-async]
handler = "{HANDLERS}:touching_async"
"""

    def touches() -> int:
        with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:
            return int(bs.stats()["cmd-touch"])

    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "touch")
        wait_watching(server, "touch-async")
        before = touches()
        ids = {insert(server, "touch", ttr=100), insert(server, "touch-async", ttr=100)}
        wait_finished(server, timeout=20)
        assert touches() - before == 2
        assert runner.stop() == 0, runner.log_tail()
    assert {(r.id, r.event) for r in read_records(out, "touch")} == {
        (i, "touched:True") for i in ids
    }


def test_a_command_asks_for_its_retry_delay(tmp_path: Path, server: KqsProcess) -> None:
    out = tmp_path / "out"
    jobs = f"""
[types.cmd]
command = ["{sys.executable}", "-m", "{HANDLERS}"]
retry = {{ max_attempts = 3, backoff = "constant", base = 0 }}
"""
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "cmd")
        job_id = insert(server, "cmd", {"exit": [3, 0], "retry_after": 2})
        wait_finished(server, timeout=30)
        assert runner.stop() == 0, runner.log_tail()
    first, second = read_records(out, "command")
    assert (first.id, first.attempt, second.id, second.attempt) == (job_id, 1, job_id, 2)
    assert 1.9 < second.at - first.at < 4, second.at - first.at  # not the policy's 0 s


def test_reports_go_to_the_server_that_owns_the_job(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    """Two kqs servers share one beanstalkd: a runner linked to both reserves each job
    through either; its report must go to the server named in the job's id (the other
    would answer not_found, and the owner would keep the job unfinished)."""
    shared = f"{beanstalkd.host}:{beanstalkd.port}"
    servers = [
        KqsProcess(tmp_path / "a", beanstalkd=shared, node="na"),
        KqsProcess(tmp_path / "b", beanstalkd=shared, node="nb"),
    ]
    out = tmp_path / "out"
    jobs = f'[types.ok]\nhandler = "{HANDLERS}:ok"\nconcurrency = 4\n'
    try:
        for kqs in servers:
            kqs.start()
        with RunnerProcess(tmp_path, jobs, servers, out) as runner:
            wait_watching(servers[0], "ok", runners=2)  # one connection per server
            ids = [insert(servers[n % 2], "ok", n) for n in range(40)]
            wait_until(lambda: len(read_records(out, "ok")) >= 40, timeout=30, what="40 runs")
            for kqs in servers:
                wait_finished(kqs, timeout=20)
                assert call(kqs, "stats")["finished"] == {"done": 20, "dead": 0}
            assert runner.stop() == 0, runner.log_tail()
        assert Counter(r.id for r in read_records(out, "ok")) == Counter({i: 1 for i in ids})
        assert {i.rpartition("-")[0] for i in ids} == {"na", "nb"}
    finally:
        for kqs in servers:
            kqs.kill()
