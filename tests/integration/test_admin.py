"""Server side of runners: hello, batched finish, dead jobs (list, retry, purge), per-type stats."""

from __future__ import annotations

import socket
from pathlib import Path
from types import TracebackType
from typing import Any

import greenstalk
import orjson
import pytest

from kqs.client import Client, RemoteError
from tests.integration.helpers import beanstalk_contents, kqs_stats, wait_fed
from tests.support import BeanstalkdProcess, KqsProcess, wait_until


class Pipeline:
    """A raw connection that sends many requests at once and reads replies as they
    come (in order of completion): what makes requests run concurrently on the server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")

    def send(self, *requests: tuple[Any, str, Any]) -> None:
        """Write (id, method, params) requests in one go."""
        lines = [orjson.dumps({"id": i, "method": m, "params": p}) for i, m, p in requests]
        self.sock.sendall(b"\n".join(lines) + b"\n")

    def read(self) -> dict[str, Any]:
        """The next reply line."""
        line = self.file.readline()
        assert line, "the server closed the connection"
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.file.close()
        self.sock.close()


def declare_dead(c: Client, ids: list[str], type_: str) -> None:
    items = [
        {"id": i, "outcome": "dead", "type": type_, "error": f"boom {i}", "attempts": 3}
        for i in ids
    ]
    results = c.call("finish", items)["results"]
    assert all(r["outcome"] == "dead" for r in results)


def test_hello_names_the_node_and_its_beanstalkd(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        hello = c.call("hello")
        job_id = c.insert("t")
    assert hello["beanstalkd"] == f"{beanstalkd.host}:{beanstalkd.port}"
    assert job_id.startswith(hello["node"] + "-")
    assert hello["version"]


def test_finish_array_reports_each_item(kqs: KqsProcess) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        a, b = c.call("insert", [{"type": "t"}, {"type": "t"}])["ids"]
        results = c.call(
            "finish",
            [
                {"id": a, "outcome": "done", "type": "t"},
                {"id": a, "outcome": "done", "type": "t"},
                {"id": "nobody-1", "outcome": "done"},
                {"id": b, "outcome": "sideways"},
                "not an object",
            ],
        )["results"]
        assert results[0] == {"id": a, "outcome": "done"}
        assert [r.get("error", {}).get("code") for r in results] == [
            None,
            "not_found",
            "not_found",
            "invalid_params",
            "invalid_params",
        ]
        stats = c.call("stats")
    assert stats["live_jobs"] == 1
    assert stats["types"]["t"]["done"] == 1


def test_dead_jobs_are_listed_paged_retried_and_purged(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        mail = c.call("insert", [{"type": "mail", "data": i} for i in range(5)])["ids"]
        img = c.call("insert", [{"type": "img", "data": i} for i in range(3)])["ids"]
        wait_fed(kqs.port)
        declare_dead(c, mail + img, "x")

        page1 = c.call("dead", {"type": "mail", "limit": 2})
        assert [j["id"] for j in page1["jobs"]] == mail[:2]
        assert page1["jobs"][0]["error"] == f"boom {mail[0]}"
        assert page1["jobs"][0]["attempts"] == 3
        assert page1["jobs"][0]["data"] == 0
        page2 = c.call("dead", {"type": "mail", "limit": 2, "after": page1["next"]})
        page3 = c.call("dead", {"type": "mail", "limit": 2, "after": page2["next"]})
        assert [j["id"] for j in page2["jobs"] + page3["jobs"]] == mail[2:]
        assert page3["next"] is None
        assert len(c.call("dead", {})["jobs"]) == 8

        assert c.call("retry", {"id": mail[0]}) == {"retried": 1}
        assert c.call("retry", {"type": "img"}) == {"retried": 3}
        with pytest.raises(RemoteError) as err:
            c.call("retry", {"ids": [mail[0], mail[1]]})  # mail[0] is live again
        assert err.value.code == "not_found"
        wait_fed(kqs.port)
        present = beanstalk_contents(beanstalkd.host, beanstalkd.port)
        for job_id in [mail[0], *img]:
            assert present[job_id]["reserves"] == 0  # a fresh beanstalkd job: attempts reset
        assert c.call("purge", {"ids": mail[1:3]}) == {"purged": 2}
        assert c.call("purge", {"all": True}) == {"purged": 2}
        stats = c.call("stats")
        assert stats["dead_jobs"] == 0
        assert stats["live_jobs"] == 4
        for bad in ({}, {"ids": "x"}, {"type": "no spaces"}):
            with pytest.raises(RemoteError) as err:
                c.call("purge", bad)
            assert err.value.code == "invalid_params"


def test_retry_removes_the_buried_copy(kqs: KqsProcess, beanstalkd: BeanstalkdProcess) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        job_id = c.insert("poison")
        wait_fed(kqs.port)
        with greenstalk.Client((beanstalkd.host, beanstalkd.port), watch="poison") as bs:
            job = bs.reserve(timeout=5)
            bs.bury(job)
            old_bid = job.id
        declare_dead(c, [job_id], "poison")
        c.call("retry", {"id": job_id})
        wait_fed(kqs.port)

    def stale_gone() -> bool:
        with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:
            try:
                bs.peek(old_bid)
            except greenstalk.NotFoundError:
                return True
            return False

    wait_until(stale_gone, timeout=10, what="buried copy deleted")
    present = beanstalk_contents(beanstalkd.host, beanstalkd.port)
    assert present[job_id]["state"] == "ready"


def test_stats_per_type_flags_a_type_nobody_runs(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        c.call("insert", [{"type": "served"}, {"type": "orphan"}, {"type": "orphan"}])
    wait_fed(kqs.port)
    with greenstalk.Client((beanstalkd.host, beanstalkd.port), watch="served"):

        def flagged() -> bool:
            s: dict[str, Any] = kqs_stats(kqs.port)
            return bool(s["types"]["served"]["runners"] == 1 and s["unattended"] == ["orphan"])

        wait_until(flagged, timeout=10, what="per-type stats")
        types = kqs_stats(kqs.port)["types"]
    assert types["orphan"]["ready"] == 2
    assert types["orphan"]["unattended"] is True
    assert types["served"]["unattended"] is False
    assert "default" not in types  # beanstalkd's own tube: no job of that type yet


def test_stats_type_default_does_not_count_kqs_as_its_runner(kqs: KqsProcess) -> None:
    """Every beanstalkd connection watches "default", kqs's feeder too: not a runner."""
    with Client("127.0.0.1", kqs.port) as c:
        c.call("insert", {"type": "default"})
    wait_fed(kqs.port)
    types = kqs_stats(kqs.port)["types"]
    assert types["default"]["ready"] == 1
    assert types["default"]["runners"] == 0
    assert types["default"]["unattended"] is True


@pytest.mark.parametrize("outcome", ["done", "dead"])
def test_two_concurrent_finishes_of_one_job_succeed_once(kqs: KqsProcess, outcome: str) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        job_id = c.insert("twice")
    finish = {"id": job_id, "outcome": outcome, "type": "twice"}
    with Pipeline(kqs.port) as p:
        p.send((1, "finish", finish), (2, "finish", finish))
        replies = {r["id"]: r for r in (p.read(), p.read())}
    results = sorted(("result" in r, r.get("error", {}).get("code")) for r in replies.values())
    assert results == [(False, "not_found"), (True, None)]
    stats = kqs_stats(kqs.port)
    assert stats["finished"][outcome] == 1
    assert stats["types"]["twice"][outcome] == 1


@pytest.mark.parametrize(
    ("first", "second"), [("retry", "retry"), ("retry", "purge"), ("purge", "finish")]
)
def test_concurrent_changes_of_one_dead_job_take_effect_once(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess, first: str, second: str
) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        job_id = c.insert("twice")
        wait_fed(kqs.port)
        declare_dead(c, [job_id], "twice")
    params = {
        "retry": {"id": job_id},
        "purge": {"id": job_id},
        "finish": {"id": job_id, "outcome": "done"},
    }
    with Pipeline(kqs.port) as p:
        p.send((1, first, params[first]), (2, second, params[second]))
        replies = {r["id"]: r for r in (p.read(), p.read())}
    assert "result" in replies[1], replies
    assert replies[2].get("error", {}).get("code") == "not_found", replies
    wait_fed(kqs.port)
    copies = 1 if first == "retry" else 0  # a retried job is fed again, once
    with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:

        def jobs_in_tube() -> int:
            tube = bs.stats_tube("twice")
            ready, reserved = tube["current-jobs-ready"], tube["current-jobs-reserved"]
            return int(ready) + int(reserved) + int(tube["current-jobs-buried"])

        wait_until(lambda: jobs_in_tube() == copies, timeout=10, what=f"{copies} copies")
    stats = kqs_stats(kqs.port)
    assert (stats["live_jobs"], stats["dead_jobs"]) == (copies, 0)
    assert stats["finished"]["done"] == 0


def test_purging_a_dead_job_deletes_its_bulk_payload(server: KqsProcess) -> None:
    bulk = server.data_dir / "bulk"

    def payloads() -> list[Path]:
        return [p for p in bulk.rglob("*") if p.is_file() and ".tmp" not in p.name]

    with Client("127.0.0.1", server.port) as c:
        job_id = c.insert("large", "z" * 100_000)  # over beanstalkd's 65535 bytes
        wait_fed(server.port)
        assert len(payloads()) == 1
        declare_dead(c, [job_id], "large")
        assert len(payloads()) == 1  # a dead job keeps its payload: it can be retried
        assert c.call("purge", {"id": job_id}) == {"purged": 1}
    wait_until(lambda: not payloads(), timeout=10, what="payload deleted")


def test_stats_per_type_tells_ready_reserved_delayed_buried_and_dead_apart(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        c.call("insert", [{"type": "t", "delay": 3600}, {"type": "t"}, {"type": "t"}])
        c.insert("t")
        wait_fed(kqs.port)
        with greenstalk.Client((beanstalkd.host, beanstalkd.port), watch="t") as runner:
            held = runner.reserve(timeout=5)
            failed = runner.reserve(timeout=5)
            job_id = orjson.loads(failed.body)["id"]
            c.call("finish", {"id": job_id, "outcome": "dead", "type": "t", "error": "x"})
            runner.bury(failed)
            types = kqs_stats(kqs.port)["types"]
            runner.release(held)
    assert types["t"] == {
        "ready": 1,
        "reserved": 1,
        "delayed": 1,
        "buried": 1,
        "runners": 1,
        "done": 0,
        "dead": 1,
        "unattended": False,
    }
