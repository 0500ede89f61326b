"""`kqs serve` as a real process, against a real beanstalkd."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from kqs.client import Client, RemoteError
from tests.integration.helpers import beanstalk_contents, kqs_stats, wait_fed
from tests.support import BeanstalkdProcess, KqsProcess


def raw(sock: socket.socket, line: bytes) -> dict[str, Any]:
    sock.sendall(line + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; got {buf!r}")
        buf += chunk
    reply: dict[str, Any] = orjson.loads(buf)
    return reply


def test_insert_one_and_an_array_reach_beanstalkd_with_their_fields(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        one = c.insert("ping", {"a": 1})
        many = c.call(
            "insert",
            [
                {"type": "mail", "data": "x", "prio": "urgent", "ttr": 120},
                {"type": "mail", "prio": 7, "delay": 3600},
                {"type": "resize.image", "prio": "bulk", "delay": 5, "ttr": 9},
            ],
        )["ids"]
    assert len(set([one, *many])) == 4
    wait_fed(kqs.port)
    jobs = beanstalk_contents(beanstalkd.host, beanstalkd.port)
    assert set(jobs) == {one, *many}
    expect = [
        (one, "ping", 10000, 0, 30),
        (many[0], "mail", 8000, 0, 120),
        (many[1], "mail", 7, 3600, 30),
        (many[2], "resize.image", 12000, 5, 9),
    ]
    for job_id, tube, pri, delay, ttr in expect:
        st = jobs[job_id]
        assert (st["tube"], st["pri"], st["delay"], st["ttr"]) == (tube, pri, delay, ttr), job_id
    stats = kqs_stats(kqs.port)
    assert stats["accepted"] == 4 and stats["fed"] == 4 and stats["live_jobs"] == 4


BAD_LINES = [
    (b"this is not json", "parse_error"),
    (b"\xff\xfe\xfd", "parse_error"),
    (b"[1, 2, 3]", "invalid_request"),
    (b'{"id": 1, "method": "fly"}', "method_not_found"),
    (b'{"id": 1, "method": "insert", "params": {"data": 1}}', "invalid_params"),
    (b'{"id": 1, "method": "insert", "params": {"type": "a b"}}', "invalid_params"),
    (
        b'{"id": 1, "method": "insert", "params": {"type": "t", "prio": "soonest"}}',
        "invalid_params",
    ),
    (b'{"id": 1, "method": "insert", "params": {"type": "t", "prio": -3}}', "invalid_params"),
    (b'{"id": 1, "method": "insert", "params": {"type": "t", "delay": -1}}', "invalid_params"),
    (b'{"id": 1, "method": "insert", "params": {"type": "t", "ttr": "10"}}', "invalid_params"),
    (b'{"id": 1, "method": "insert", "params": []}', "invalid_params"),
    (
        b'{"id": 1, "method": "insert", "params": [{"type": "ok"}, {"type": "ok", "ttr": 0}]}',
        "invalid_params",
    ),
    (b'{"id": 1, "method": "finish", "params": {"id": "nope-1", "outcome": "done"}}', "not_found"),
    (b'{"id": 1, "method": "finish", "params": {"id": "x", "outcome": "meh"}}', "invalid_params"),
]


def test_bad_input_gets_a_stable_error_and_the_connection_goes_on(
    kqs: KqsProcess, beanstalkd: BeanstalkdProcess
) -> None:
    with socket.create_connection(("127.0.0.1", kqs.port), timeout=10) as sock:
        for line, code in BAD_LINES:
            reply = raw(sock, line)
            assert reply["error"]["code"] == code, (line, reply)
            assert reply["error"]["message"]
        assert raw(sock, b'{"id": "still", "method": "ping"}') == {"id": "still", "result": "pong"}
    stats = kqs_stats(kqs.port)
    assert stats["accepted"] == 0 and stats["live_jobs"] == 0
    assert beanstalk_contents(beanstalkd.host, beanstalkd.port) == {}


def test_over_long_line_is_refused_and_the_connection_closed(kqs: KqsProcess) -> None:
    with socket.create_connection(("127.0.0.1", kqs.port), timeout=10) as sock:
        sock.sendall(b'{"id":1,"method":"echo","params":["' + b"x" * 5000 + b'"]}\n')
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply = orjson.loads(data.splitlines()[0])
    assert reply["error"]["code"] == "line_too_long"
    with Client("127.0.0.1", kqs.port) as c:  # the server is fine
        assert c.call("ping") == "pong"


def test_pipelined_requests_all_get_their_replies(kqs: KqsProcess) -> None:
    n = 500
    lines = b"".join(
        orjson.dumps({"id": i, "method": "insert", "params": {"type": "p", "data": i}}) + b"\n"
        for i in range(n)
    )
    with socket.create_connection(("127.0.0.1", kqs.port), timeout=20) as sock:
        sock.sendall(lines)
        f = sock.makefile("rb")
        replies = [orjson.loads(f.readline()) for _ in range(n)]
    assert sorted(r["id"] for r in replies) == list(range(n))
    assert all(len(r["result"]["ids"]) == 1 for r in replies)
    stats = kqs_stats(kqs.port)
    assert stats["journal"]["fsyncs"] < n  # group commit: inserts shared fsyncs


def test_finish_retires_jobs_and_a_dead_job_is_kept(kqs: KqsProcess) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        a, b = c.call("insert", [{"type": "t"}, {"type": "t"}])["ids"]
        assert c.call("finish", {"id": a, "outcome": "done"}) == {"id": a, "outcome": "done"}
        c.call("finish", {"id": b, "outcome": "dead", "error": "boom", "attempts": 3})
        with pytest.raises(RemoteError) as err:
            c.call("finish", {"id": a, "outcome": "done"})
        assert err.value.code == "not_found"
        stats = c.call("stats")
    assert stats["live_jobs"] + stats["dead_jobs"] == 1
    assert stats["dead_jobs"] == 1
    assert stats["finished"] == {"done": 1, "dead": 1}


def test_quit_drains_and_exits_zero(kqs: KqsProcess) -> None:
    with Client("127.0.0.1", kqs.port) as c:
        c.insert("t", 1)
        assert c.call("quit") == "shutting down"
    assert kqs.proc is not None
    assert kqs.proc.wait(20) == 0


ECHOED = [
    {"id": 1, "method": "echo", "params": {}},
    {"id": 2, "method": "echo", "params": []},
    {"id": 3, "method": "echo", "params": {"a": [1, -2.5, None, True, "é\u2603\U0001f600"]}},
    {"id": "s", "method": "echo", "params": [{"nested": {"deep": [[[]]]}}, 18446744073709551615]},
    {"id": 5, "method": "echo", "params": {"$base64": "aGVsbG8=", "": "", "\u0000": "\n"}},
]


@pytest.mark.parametrize("request_", ECHOED, ids=lambda r: str(r["id"]))
def test_echo_returns_its_params_exactly(kqs: KqsProcess, request_: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", kqs.port), timeout=10) as sock:
        reply = raw(sock, orjson.dumps(request_))
    assert reply == {"id": request_["id"], "result": request_["params"]}


def test_echo_without_params_returns_an_empty_object(kqs: KqsProcess) -> None:
    with socket.create_connection(("127.0.0.1", kqs.port), timeout=10) as sock:
        assert raw(sock, b'{"id": 1, "method": "echo"}') == {"id": 1, "result": {}}


def test_stats_counts_the_journal_segments_on_disk(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    kqs = KqsProcess(
        tmp_path / "data",
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
        segment_bytes=4096,
    )
    kqs.start()
    try:
        with Client("127.0.0.1", kqs.port) as c:
            for i in range(12):  # about 24 KiB of live jobs: several 4 KiB segments
                c.call("insert", [{"type": "seg", "data": f"{i}-{n}-" + "x" * 900} for n in (1, 2)])
            segments = c.call("stats")["journal"]["segments"]
        on_disk = sorted((tmp_path / "data" / "journal").glob("*.seg"))
        assert segments > 1
        assert segments == len(on_disk), [p.name for p in on_disk]
    finally:
        kqs.kill()
