"""Looking into a real beanstalkd from tests, independently of kqs (with greenstalk)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import greenstalk
import orjson

from kqs.client import Client, RemoteError
from tests.support import wait_until


def beanstalk_contents(host: str, port: int) -> dict[str, dict[str, Any]]:
    """kqs id -> beanstalkd stats-job (plus 'bid') for every kqs job beanstalkd holds now.

    A job that is not a kqs job is left out: after a kill -9, a beanstalkd binlog can
    restore a job whose body is zeros (it wrote the record header but not the body), and
    kqs re-feeds the real job under a new beanstalkd id (runners bury such a job).
    """
    with (
        greenstalk.Client((host, port), use="kqs-test-probe", encoding=None) as bs,
        socket.create_connection((host, port), timeout=10) as raw,
        raw.makefile("rb") as stream,
    ):
        upper = bs.put(b"probe")  # ids are sequential: every job has a smaller id
        bs.delete(upper)
        found: dict[str, dict[str, Any]] = {}
        for bid in range(1, upper):
            body = _peek(raw, stream, bid)
            if body is None:
                continue
            try:
                kqs_id = orjson.loads(body)["id"]
            except (orjson.JSONDecodeError, TypeError, KeyError):
                continue  # not a kqs job (see above)
            stats = dict(bs.stats_job(bid))
            stats["bid"] = bid
            found[kqs_id] = stats
        return found


def _peek(raw: socket.socket, stream: BinaryIO, bid: int) -> bytes | None:
    """The body of beanstalkd job `bid`, or None if there is none. greenstalk's peek
    insists that a body ends in CRLF; a damaged restored body need not."""
    raw.sendall(b"peek %d\r\n" % bid)
    reply = stream.readline().split()
    if reply[0] == b"NOT_FOUND":
        return None
    assert reply[0] == b"FOUND", reply
    data = stream.read(int(reply[2]) + 2)  # beanstalkd always sends body + 2 bytes
    return data[:-2]


def kqs_stats(port: int) -> dict[str, Any]:
    with Client("127.0.0.1", port, timeout=10) as c:
        result: dict[str, Any] = c.call("stats")
        return result


def beanstalkd_address(port: int) -> tuple[str, int]:
    host, _, bport = kqs_stats(port)["beanstalkd"]["address"].rpartition(":")
    return host, int(bport)


def wait_fed(port: int, timeout: float = 20) -> None:
    """Wait until the server has nothing left to feed and is connected to beanstalkd."""

    def done() -> bool:
        s = kqs_stats(port)
        return bool(s["pending"] == 0 and s["beanstalkd"]["reachable"] and not s["verifying"])

    wait_until(done, timeout=timeout, what="feeder idle")


def kqs_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `kqs` command (this checkout's) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "kqs", *args], capture_output=True, text=True, timeout=30
    )


Params = dict[str, Any] | list[dict[str, Any]]


class Inserters:
    """Client threads inserting until `total` jobs are acknowledged (or for ever), each
    stopping at its first error: a killed or draining server ends them this way.

    Thread n of `threads` talks to `ports[n % len(ports)]`; its i-th call inserts
    `jobs(n, i)` (one job object, or a list sent as one array). Every acknowledged id
    is in `acked`, every error in `errors`.
    """

    def __init__(
        self,
        ports: Sequence[int],
        jobs: Callable[[int, int], Params],
        *,
        threads: int,
        total: int | None = None,
        timeout: float = 30,
    ) -> None:
        self.ports = ports
        self.jobs = jobs
        self.total = total
        self.timeout = timeout
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(n,)) for n in range(threads)]

    def loop(self, n: int) -> None:
        try:
            with Client("127.0.0.1", self.ports[n % len(self.ports)], timeout=self.timeout) as c:
                i = 0
                while self.total is None or self.count() < self.total:
                    i += 1
                    ids = c.call("insert", self.jobs(n, i))["ids"]
                    with self.lock:
                        self.acked.extend(ids)
        except (OSError, RemoteError) as exc:
            with self.lock:
                self.errors.append(repr(exc))

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def reached(self, count: int) -> Callable[[], bool]:
        """For wait_until: True once `count` jobs are acknowledged."""
        return lambda: self.count() >= count

    def __enter__(self) -> Inserters:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.threads:
            t.join(60)
