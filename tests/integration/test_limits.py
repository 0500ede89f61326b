"""Connection limits, slow and idle clients, authentication and TLS on a real server."""

from __future__ import annotations

import gc
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kqs.client import Client, RemoteError
from tests.support import BeanstalkdProcess, KqsProcess

TOKEN = "user-token-0123456789"
ADMIN = "admin-token-0123456789"


def server(tmp_path: Path, beanstalkd: BeanstalkdProcess, **config: Any) -> KqsProcess:
    kqs = KqsProcess(tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}", **config)
    kqs.start()
    return kqs


@pytest.fixture
def limited(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> Iterator[KqsProcess]:
    kqs = server(
        tmp_path, beanstalkd, max_connections=3, idle_timeout=2, line_timeout=1, write_timeout=1
    )
    yield kqs
    kqs.kill()


def last_words(sock: socket.socket, timeout: float = 10) -> list[dict[str, Any]]:
    """Read until the server closes; return the JSON lines it sent."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return [orjson.loads(line) for line in data.splitlines()]


def admitted(port: int) -> Client:
    """A connection the server counted (the start-up probe's may still be closing)."""
    for _ in range(50):
        c = Client("127.0.0.1", port)
        try:
            c.call("ping")
            return c
        except (RemoteError, ConnectionError):
            c.close()
    raise AssertionError("never admitted")


def test_connections_over_the_limit_are_told_and_closed(limited: KqsProcess) -> None:
    keep = [admitted(limited.port) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", limited.port)) as extra:
            (reply,) = last_words(extra)
        assert reply["error"]["code"] == "too_many_connections"
        assert all(c.call("ping") == "pong" for c in keep)
    finally:
        for c in keep:
            c.close()


def test_a_slow_client_is_cut_off_and_others_do_not_notice(limited: KqsProcess) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as slow:
        slow.sendall(b'{"id": 1, "method": "pi')  # and never the rest
        with Client("127.0.0.1", limited.port) as other:
            assert other.call("ping") == "pong"
        (reply,) = last_words(slow)
    assert reply["error"]["code"] == "timeout"
    assert "line" in reply["error"]["message"]


def test_an_idle_connection_is_closed_with_a_reason(limited: KqsProcess) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as idle:
        idle.sendall(b'{"id": 1, "method": "ping"}\n')
        replies = last_words(idle)
    assert replies[0] == {"id": 1, "result": "pong"}
    assert replies[1]["error"]["code"] == "timeout"
    assert "idle" in replies[1]["error"]["message"]


def flood(sock: socket.socket, line: bytes) -> None:
    for _ in range(5000):
        sock.sendall(line)


def test_a_client_that_never_reads_replies_is_dropped(limited: KqsProcess) -> None:
    big = "x" * 60_000
    line = orjson.dumps({"id": 1, "method": "echo", "params": [big]}) + b"\n"
    with socket.create_connection(("127.0.0.1", limited.port)) as greedy:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.settimeout(15)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            flood(greedy, line)  # the server aborts the connection: our sends start failing
        with Client("127.0.0.1", limited.port) as other:
            assert other.call("ping") == "pong"


@pytest.fixture
def guarded(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> Iterator[KqsProcess]:
    kqs = server(tmp_path, beanstalkd, auth_token=TOKEN, admin_token=ADMIN)
    yield kqs
    kqs.kill()


def test_with_a_token_nothing_works_before_auth(guarded: KqsProcess) -> None:
    with Client("127.0.0.1", guarded.port) as c:
        for method in ("ping", "insert", "stats", "quit"):
            with pytest.raises(RemoteError) as err:
                c.call(method, {"type": "t"})
            assert err.value.code == "unauthorized"
        assert c.call("auth", {"token": TOKEN}) == {"admin": False}
        assert c.call("ping") == "pong"
        assert c.insert("t")
        for method, params in (("purge", {"all": True}), ("retry", {"type": "t"}), ("gc", {})):
            with pytest.raises(RemoteError) as err:
                c.call(method, params)
            assert err.value.code == "forbidden"
    with Client("127.0.0.1", guarded.port, token=ADMIN) as admin:
        assert admin.call("purge", {"all": True}) == {"purged": 0}


def test_a_client_refused_its_token_closes_its_socket(guarded: KqsProcess) -> None:
    with pytest.raises(RemoteError) as err:
        Client("127.0.0.1", guarded.port, token="guess-guess-guess")
    assert err.value.code == "unauthorized"
    del err  # its traceback holds the half-made Client
    gc.collect()  # a socket left open warns now (ResourceWarning), which fails the test


def test_a_wrong_token_closes_the_connection(guarded: KqsProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b'{"id": 1, "method": "auth", "params": {"token": "guess-guess-guess"}}\n')
        (reply,) = last_words(sock)
    assert reply["error"]["code"] == "unauthorized"


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> None:
    cert, key = make_cert(tmp_path)
    kqs = server(tmp_path, beanstalkd, tls_cert=str(cert), tls_key=str(key))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        with Client("127.0.0.1", kqs.port, tls=context) as c:
            assert c.call("ping") == "pong"
        with socket.create_connection(("127.0.0.1", kqs.port)) as plain:
            plain.settimeout(10)
            plain.sendall(b'{"id": 1, "method": "ping"}\n')
            assert b"pong" not in plain.recv(1000)
    finally:
        kqs.kill()
