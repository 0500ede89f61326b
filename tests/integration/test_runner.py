"""`kqs run` against real kqs servers and beanstalkd: success, retries, dead jobs, commands.

Runners are child processes; their handlers (tests/integration/runner_handlers.py) write
what they did to files, which the tests read.
"""

from __future__ import annotations

import base64
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
retry = {{ max_attempts = 3, backoff = "constant", base = 0 }}
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
        ok_ids = [insert(server, "ok", n) for n in range(50)]
        wait_until(
            lambda: (
                call(server, "stats")["dead_jobs"] == 2 and call(server, "stats")["live_jobs"] == 0
            ),
            timeout=30,
            what="two dead jobs, nothing live",
        )
        # other jobs kept flowing
        assert Counter(r.id for r in read_records(out, "ok")) == Counter({i: 1 for i in ok_ids})
        assert [r.attempt for r in read_records(out, "poison")] == [1, 2, 3]
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
