"""Large and binary payloads end to end (insert -> bulk store -> runner), on both stores."""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from pymongo import MongoClient

from kqs.client import Client
from tests.integration.runner_handlers import read_records
from tests.integration.runner_support import RunnerProcess, call, wait_finished, wait_watching
from tests.mongo import MongodProcess, unique_database
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

MiB = 2**20
HANDLERS = "tests.integration.runner_handlers"


@pytest.fixture(params=["file", "mongo"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "bulk").as_uri()
    mongod: MongodProcess = request.getfixturevalue("mongod")
    return mongod.url(unique_database())


def stored_payloads(url: str) -> int:
    if url.startswith("file:"):
        directory = Path(url.removeprefix("file://"))
        return len([p for p in directory.glob("*") if p.is_file()]) if directory.exists() else 0
    client: MongoClient[dict[str, object]] = MongoClient(url)
    try:
        return client.get_default_database()["bulk.files"].count_documents({})
    finally:
        client.close()


@pytest.fixture
def server(tmp_path: Path, beanstalkd: BeanstalkdProcess, store_url: str) -> Iterator[KqsProcess]:
    kqs = KqsProcess(
        tmp_path / "data",
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
        bulk_store=store_url,
        max_payload_bytes=32 * MiB,
        max_line_bytes=48 * MiB,
    )
    kqs.start()
    yield kqs
    kqs.kill()


def sha(data: object) -> str:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return hashlib.sha256(raw).hexdigest()


def test_5_and_20_mib_jobs_and_binary_payloads_run_end_to_end(
    tmp_path: Path, server: KqsProcess, store_url: str
) -> None:
    text_5 = "a" * (5 * MiB)
    text_20 = {"chunks": ["b" * MiB] * 20}
    small_bytes = os.urandom(1000)
    large_bytes = os.urandom(3 * MiB)
    cases = {
        "5 MiB": (text_5, sha(text_5)),
        "20 MiB": (text_20, sha(text_20)),
        "small binary": ({"$base64": base64.b64encode(small_bytes).decode()}, sha(small_bytes)),
        "large binary": ({"$base64": base64.b64encode(large_bytes).decode()}, sha(large_bytes)),
    }
    out = tmp_path / "out"
    with RunnerProcess(tmp_path, f'[types.blob]\nhandler = "{HANDLERS}:digest"\n', [server], out):
        wait_watching(server, "blob")
        ids = {}
        with Client("127.0.0.1", server.port, timeout=120) as c:
            for name, (data, _) in cases.items():
                ids[c.insert("blob", data)] = name
        wait_finished(server, timeout=120)
    seen = {r.id: r.event for r in read_records(out, "digest")}
    assert {ids[i]: digest for i, digest in seen.items()} == {
        name: digest for name, (_, digest) in cases.items()
    }
    stats = call(server, "stats")
    assert stats["bulk"]["stored"] == 3  # all but the small binary job went through the store
    wait_until(lambda: stored_payloads(store_url) == 0, timeout=20, what="payloads deleted")


def test_a_command_handler_gets_the_full_body_and_base64_values_as_they_are(
    tmp_path: Path, server: KqsProcess, store_url: str
) -> None:
    """A command handler gets, on stdin, the whole body of a job fed as a bulk reference
    (fetched from the store, not the reference), and `{"$base64": ...}` values untouched
    (only Python handlers get bytes), like a job small enough for beanstalkd."""
    blob = {"$base64": base64.b64encode(os.urandom(3000)).decode()}
    large = {"exit": 0, "text": "c" * (200 * 1024), "blob": blob}
    small = {"exit": 0, "blob": blob}
    out = tmp_path / "out"
    jobs = f'[types.cmd]\ncommand = ["{sys.executable}", "-m", "{HANDLERS}"]\n'
    with RunnerProcess(tmp_path, jobs, [server], out) as runner:
        wait_watching(server, "cmd")
        with Client("127.0.0.1", server.port, timeout=30) as c:
            large_id = c.insert("cmd", large, ttr=40)
            small_id = c.insert("cmd", small, ttr=40)
        wait_finished(server, timeout=60)
        assert runner.stop() == 0, runner.log_tail()
    assert call(server, "stats")["bulk"]["stored"] == 1  # the large one went through the store
    got = {i: orjson.loads((out / f"stdin-{i}-1.json").read_bytes()) for i in (large_id, small_id)}
    assert got[large_id]["data"] == large
    assert got[small_id]["data"] == small
    assert got[large_id]["data"]["blob"] == blob  # the same text, not decoded
    assert set(got[large_id]) == set(got[small_id])  # every field of the body, no "bulk"
    assert "bulk" not in got[large_id]
    assert got[large_id]["id"] == large_id and got[large_id]["ttr"] == 40
