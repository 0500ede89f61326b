"""Looking into a real beanstalkd from tests, independently of kqs (with greenstalk)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import greenstalk
import orjson

from kqs.client import Client
from tests.support import wait_until


def beanstalk_contents(host: str, port: int) -> dict[str, dict[str, Any]]:
    """kqs id -> beanstalkd stats-job (plus 'bid') for every job beanstalkd holds now."""
    with greenstalk.Client((host, port), use="kqs-test-probe", encoding=None) as bs:
        upper = bs.put(b"probe")  # ids are sequential: every job has a smaller id
        bs.delete(upper)
        found: dict[str, dict[str, Any]] = {}
        for bid in range(1, upper):
            try:
                job = bs.peek(bid)
            except greenstalk.NotFoundError:
                continue
            body = orjson.loads(job.body)
            stats = dict(bs.stats_job(bid))
            stats["bid"] = bid
            found[body["id"]] = stats
        return found


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
