"""The contract under crashes: acknowledged jobs are never lost (real processes, kill -9)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import greenstalk
import orjson
import pytest

from kqs.client import Client
from tests.integration.helpers import (
    Inserters,
    Params,
    beanstalk_contents,
    beanstalkd_address,
    kqs_stats,
    wait_fed,
)
from tests.integration.test_admin import Pipeline
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

CLIENTS = 16
ROUNDS = 3


def mixed_jobs(n: int, i: int) -> Params:
    """Singles (half of them delayed) and every fifth call an array of 10."""
    if i % 5 == 0:
        return [{"type": f"t{n % 3}", "data": [n, i, k]} for k in range(10)]
    return {"type": f"t{n % 3}", "data": [n, i], "delay": i % 2 * 600}


def inserters(port: int) -> Inserters:
    """CLIENTS threads inserting until their connection dies."""
    return Inserters([port], mixed_jobs, threads=CLIENTS, timeout=10)


def check_all_present(server: KqsProcess, acked: list[str]) -> None:
    wait_fed(server.port, timeout=60)
    host, port = beanstalkd_address(server.port)
    present = set(beanstalk_contents(host, port))
    lost = set(acked) - present
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged jobs lost, e.g. {sorted(lost)[:5]}"


@pytest.mark.parametrize("mode", ["external", "embedded"])
def test_kill_9_during_concurrent_inserts_loses_no_acknowledged_job(
    tmp_path: Path, mode: str
) -> None:
    external = BeanstalkdProcess() if mode == "external" else None
    if external is not None:
        external.start()
    server = KqsProcess(
        tmp_path / "data",
        beanstalkd=f"{external.host}:{external.port}" if external else "embedded",
        segment_bytes=64 * 1024,
    )
    rng = random.Random()
    acked: list[str] = []
    try:
        server.start()
        for _ in range(ROUNDS):
            # insert for a random 0.5-3 s (and at least 200 acks), then kill at once
            seconds = rng.uniform(0.5, 3.0)
            with inserters(server.port) as ins:
                started = time.monotonic()
                wait_until(ins.reached(200), timeout=60, what="inserts")
                time.sleep(max(0.0, started + seconds - time.monotonic()))  # the random moment
                server.kill()
            acked += ins.acked
            server.start()
            check_all_present(server, acked)
        assert len(acked) >= ROUNDS * 200
    finally:
        server.kill()
        if external is not None:
            external.stop()


def test_beanstalkd_killed_and_binlog_deleted_jobs_are_fed_again(tmp_path: Path) -> None:
    server = KqsProcess(tmp_path / "data")
    server.start()
    try:
        with Client("127.0.0.1", server.port) as c:
            ids = c.call(
                "insert", [{"type": "later", "delay": 3600, "data": i} for i in range(300)]
            )["ids"]
            done = c.call("insert", {"type": "now"})["ids"][0]
        wait_fed(server.port)
        with Client("127.0.0.1", server.port) as c:
            c.call("finish", {"id": done, "outcome": "done"})
        before = kqs_stats(server.port)["beanstalkd"]
        os.kill(before["pid"], signal.SIGKILL)
        shutil.rmtree(tmp_path / "data" / "beanstalkd")

        def back() -> bool:
            b = kqs_stats(server.port)["beanstalkd"]
            return bool(b["pid"] != before["pid"] and b["reachable"] and b["restarts"] >= 1)

        wait_until(back, timeout=30, what="embedded beanstalkd restarted")
        refed = lambda: kqs_stats(server.port)["feeder"]["refed"] >= len(ids)  # noqa: E731
        wait_until(refed, timeout=30, what="lost jobs found")
        wait_fed(server.port)
        host, port = beanstalkd_address(server.port)
        present = beanstalk_contents(host, port)
        assert set(ids) <= set(present)
        assert done not in present  # finished jobs are not fed again
        assert all(present[i]["delay"] > 3500 for i in ids)  # the due time is kept
    finally:
        server.kill()


def test_a_job_restored_with_a_zeroed_body_is_deleted_and_fed_again(tmp_path: Path) -> None:
    """beanstalkd killed between writing a binlog record's header and its body restores
    the job with a body of NULs: kqs feeds the real job again and deletes the husk."""
    beanstalkd = BeanstalkdProcess(binlog_dir=tmp_path / "binlog")
    beanstalkd.start()
    server = KqsProcess(tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}")
    try:
        server.start()
        with Client("127.0.0.1", server.port) as c:
            ids = c.call("insert", [{"type": "t", "delay": 3600, "data": i} for i in range(3)])
        wait_fed(server.port)
        before = beanstalk_contents(beanstalkd.host, beanstalkd.port)
        assert server.stop() == 0  # its beanstalkd ids are in the journal
        beanstalkd.kill()
        (binlog,) = (tmp_path / "binlog").glob("binlog.*")
        content = binlog.read_bytes()
        body = orjson.dumps({"id": ids["ids"][1]})[:-1]  # the record's first bytes
        at = content.index(body)
        end = content.index(b"\r\n", at) + 2
        binlog.write_bytes(content[:at] + bytes(end - at) + content[end:])
        beanstalkd.start()
        husk = before[ids["ids"][1]]["bid"]
        with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:
            assert bs.stats()["current-jobs-delayed"] == 3  # the husk is there
        server.start()
        wait_fed(server.port)
        present = beanstalk_contents(beanstalkd.host, beanstalkd.port)
        assert set(ids["ids"]) == set(present)
        assert husk not in {p["bid"] for p in present.values()}
        with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:
            assert bs.stats()["current-jobs-delayed"] == 3  # the husk is gone
    finally:
        server.kill()
        beanstalkd.stop()


def test_finished_jobs_free_their_segments(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> None:
    server = KqsProcess(
        tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}", segment_bytes=4096
    )
    server.start()
    journal = tmp_path / "data" / "journal"
    try:
        with Client("127.0.0.1", server.port) as c:
            ids: list[str] = []
            for _ in range(30):
                ids += c.call("insert", [{"type": "t", "data": "x" * 100}] * 20)["ids"]
            assert len(list(journal.glob("*.seg"))) >= 10
            for job_id in ids:
                c.call("finish", {"id": job_id, "outcome": "done"})
        wait_until(lambda: len(list(journal.glob("*.seg"))) <= 2, timeout=10, what="retirement")
        assert kqs_stats(server.port)["live_jobs"] == 0
        server.stop()
        server.start()  # nothing comes back after a restart
        assert kqs_stats(server.port)["live_jobs"] == 0
    finally:
        server.kill()


def test_sigterm_drains_and_exits_zero_keeping_every_job(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    server = KqsProcess(tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}")
    server.start()
    with inserters(server.port) as ins:
        wait_until(ins.reached(500), timeout=60, what="inserts")
        assert server.stop() == 0
    server.start()
    try:
        check_all_present(server, ins.acked)
    finally:
        server.kill()


def test_draining_refuses_new_inserts_and_keeps_those_in_flight(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    """`quit` arrives while an insert waits for its fsync: that insert is still
    acknowledged, and survives; an insert sent once draining began is `shutting_down`."""
    server = KqsProcess(tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}")
    server.start()
    jobs = [{"type": "drain", "data": ["x" * 100, i]} for i in range(5000)]
    try:
        with Pipeline(server.port) as p:
            p.send((1, "insert", jobs), (2, "quit", {}))  # one write: both in flight
            first = p.read()
            assert first == {"id": 2, "result": "shutting down"}
            p.send((3, "insert", {"type": "drain"}))
            replies = {r["id"]: r for r in (p.read(), p.read())}
        assert replies[3]["error"]["code"] == "shutting_down"
        acked = replies[1]["result"]["ids"]
        assert len(acked) == len(jobs)
        assert server.proc is not None
        assert server.proc.wait(30) == 0
        server.start()
        assert kqs_stats(server.port)["live_jobs"] == len(jobs)
        check_all_present(server, acked)
    finally:
        server.kill()
