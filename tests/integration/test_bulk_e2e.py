"""Large and binary payloads end to end (insert -> bulk store -> runner), on both stores."""

from __future__ import annotations

import base64
import hashlib
import os
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
