"""The feeder against a real beanstalkd: stale copies held by runners, and beanstalkd's
own job size limit."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import greenstalk
import orjson
import pytest

from kqs.client import Client
from tests.integration.helpers import beanstalk_contents, kqs_stats, wait_fed
from tests.support import (
    BeanstalkdProcess,
    KqsProcess,
    beanstalkd_binary,
    port_open,
    stop_process,
    wait_until,
)


def beanstalkd_stats(beanstalkd: BeanstalkdProcess) -> dict[str, Any]:
    with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:
        return dict(bs.stats())


def gone(beanstalkd: BeanstalkdProcess, bid: int) -> bool:
    """True once beanstalkd has no job `bid`."""
    with greenstalk.Client((beanstalkd.host, beanstalkd.port)) as bs:
        try:
            bs.peek(bid)
        except greenstalk.NotFoundError:
            return True
        return False


RESULT_KEY = {"retry": "retried", "purge": "purged"}


@pytest.mark.parametrize("admin", ["retry", "purge"])
def test_a_stale_copy_reserved_by_a_runner_is_deleted_once_it_lets_go(
    server: KqsProcess, beanstalkd: BeanstalkdProcess, admin: str
) -> None:
    """A runner reports `dead` and holds the job until the acknowledgement, then buries
    it. A retry or purge in between cannot delete the reserved copy (beanstalkd answers
    NOT_FOUND to a delete of a job another connection reserved): kqs must try again, so
    the buried copy does not stay for good."""
    with Client("127.0.0.1", server.port) as c:
        job_id = c.insert("race")
        wait_fed(server.port)
        with greenstalk.Client((beanstalkd.host, beanstalkd.port), watch="race") as runner:
            held = runner.reserve(timeout=5)
            finished = c.call("finish", {"id": job_id, "outcome": "dead", "type": "race"})
            assert finished == {"id": job_id, "outcome": "dead"}
            deletes = beanstalkd_stats(beanstalkd)["cmd-delete"]
            assert c.call(admin, {"id": job_id}) == {RESULT_KEY[admin]: 1}
            wait_until(
                lambda: beanstalkd_stats(beanstalkd)["cmd-delete"] > deletes,
                what="kqs tried to delete the stale copy",
            )
            assert not gone(beanstalkd, held.id)  # still reserved by the runner
            runner.bury(held)
        wait_until(lambda: gone(beanstalkd, held.id), timeout=10, what="stale copy deleted")
        wait_fed(server.port)
    present = beanstalk_contents(beanstalkd.host, beanstalkd.port)
    if admin == "retry":
        assert present[job_id]["state"] == "ready"
        assert present[job_id]["bid"] != held.id
    else:
        assert job_id not in present


@pytest.fixture
def small_beanstalkd() -> Iterator[BeanstalkdProcess]:
    """A real beanstalkd whose max-job-size (-z) is 2000 bytes."""
    bs = BeanstalkdProcess()
    bs.proc = subprocess.Popen(
        [beanstalkd_binary(), "-l", bs.host, "-p", str(bs.port), "-z", "2000"]
    )
    try:
        wait_until(lambda: port_open(bs.host, bs.port), what=f"beanstalkd on {bs.port}")
        yield bs
    finally:
        stop_process(bs.proc, 5)


def test_beanstalkds_max_job_size_decides_what_goes_to_the_bulk_store(
    tmp_path: Path, small_beanstalkd: BeanstalkdProcess
) -> None:
    """kqs is configured for the default limit (65535), beanstalkd takes 2000 bytes: a
    5000-byte job is fed as a bulk reference straight away (one put, no refusal)."""
    bs = small_beanstalkd
    server = KqsProcess(tmp_path / "data", beanstalkd=f"{bs.host}:{bs.port}")
    server.start()
    try:
        with Client("127.0.0.1", server.port) as c:
            job_id = c.insert("large", "y" * 5000)
        wait_fed(server.port)
        assert beanstalkd_stats(bs)["cmd-put"] == 1  # not refused with JOB_TOO_BIG first
        present = beanstalk_contents(bs.host, bs.port)
        with greenstalk.Client((bs.host, bs.port), encoding=None) as probe:
            reference = orjson.loads(probe.peek(present[job_id]["bid"]).body)
        assert reference["id"] == job_id
        assert reference["bulk"] > 5000
        assert kqs_stats(server.port)["bulk"]["stored"] == 1
    finally:
        server.kill()
