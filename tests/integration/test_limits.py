"""Connection limits, slow and idle clients, authentication and TLS on a real server."""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kqs.client import Client, RemoteError
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

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


def test_auth_pipelined_with_a_request_in_one_write(guarded: KqsProcess) -> None:
    with (
        socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock,
        sock.makefile("rb") as f,
    ):
        auth = {"id": 1, "method": "auth", "params": {"token": TOKEN}}
        sock.sendall(orjson.dumps(auth) + b"\n" + b'{"id": 2, "method": "ping"}\n')
        replies = {r["id"]: r for r in (orjson.loads(f.readline()) for _ in range(2))}
    assert replies[1] == {"id": 1, "result": {"admin": False}}
    assert replies[2] == {"id": 2, "result": "pong"}


def test_quit_and_retry_of_a_type_need_the_admin_token(guarded: KqsProcess) -> None:
    with Client("127.0.0.1", guarded.port, token=TOKEN) as user:
        with pytest.raises(RemoteError) as err:
            user.call("quit")
        assert err.value.code == "forbidden"
        job = user.insert("t")
        user.call("finish", {"id": job, "outcome": "dead", "error": "boom"})
        assert user.call("retry", {"ids": [job]}) == {"retried": 1}  # by id: user level
        user.call("finish", {"id": job, "outcome": "dead", "error": "boom again"})
        del err
    with Client("127.0.0.1", guarded.port, token=ADMIN) as admin:
        assert admin.call("retry", {"type": "t"}) == {"retried": 1}
        assert admin.call("quit") == "shutting down"
    assert guarded.proc is not None and guarded.proc.wait(20) == 0


def test_a_client_with_a_token_may_use_a_server_without_one(limited: KqsProcess) -> None:
    with Client("127.0.0.1", limited.port, token=TOKEN) as c:  # auth succeeds
        assert c.call("auth", {"token": "any-other-token"}) == {"admin": True}
        assert c.call("ping") == "pong"


def test_an_insert_array_over_the_limit_is_refused_whole(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    kqs = server(tmp_path, beanstalkd, max_jobs_per_insert=3)
    try:
        with Client("127.0.0.1", kqs.port) as c:
            assert len(c.call("insert", [{"type": "t"}] * 3)["ids"]) == 3
            with pytest.raises(RemoteError) as err:
                c.call("insert", [{"type": "t"}] * 4)
            assert err.value.code == "invalid_params"
            assert "at most 3" in err.value.message
            stats = c.call("stats")
        assert stats["accepted"] == 3 and stats["live_jobs"] == 3
    finally:
        kqs.kill()


class Pinger(threading.Thread):
    """Pings on its own connection until stopped; records each round trip's time and
    any error."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__()
        self.port = port
        self.stop = stop
        self.times: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with Client("127.0.0.1", self.port, timeout=5) as c:
                while not self.stop.is_set():
                    began = time.monotonic()
                    assert c.call("ping") == "pong"
                    self.times.append(time.monotonic() - began)
                    time.sleep(0.02)
        except Exception as exc:  # reported by the test
            self.errors.append(repr(exc))


def trickle(sock: socket.socket, every: float, within: float) -> tuple[bytes, float]:
    """Send a byte of an endless request line every `every` s until the server closes
    the connection; return what it sent and how long that took."""
    sock.setblocking(False)
    began = time.monotonic()
    received = b""
    line = b'{"id": 1, "method": "echo", "params": ["' + b"x" * 10_000
    for byte in line:
        assert time.monotonic() - began < within, "the slow client was never cut off"
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            chunk = None
        if chunk is not None:
            received += chunk
            if chunk == b"":
                return received, time.monotonic() - began
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(every)
    sock.settimeout(5)
    return received + last_bytes(sock), time.monotonic() - began


def last_bytes(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_trickling_client_is_cut_off_while_others_are_served(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    kqs = server(tmp_path, beanstalkd, line_timeout=1, idle_timeout=60)
    stop = threading.Event()
    pingers = [Pinger(kqs.port, stop) for _ in range(4)]
    try:
        for p in pingers:
            p.start()
        with socket.create_connection(("127.0.0.1", kqs.port)) as slow:
            data, took = trickle(slow, every=0.2, within=15)
        stop.set()
        for p in pingers:
            p.join(10)
    finally:
        stop.set()
        kqs.kill()
    (reply,) = [orjson.loads(line) for line in data.splitlines()]
    assert reply["error"]["code"] == "timeout" and "line" in reply["error"]["message"]
    assert 1 <= took < 4, took  # line_timeout, plus at most a sweep or two
    for p in pingers:
        assert not p.errors, p.errors
        assert len(p.times) >= 10 and max(p.times) < 1.0, (len(p.times), max(p.times, default=0))


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, or None."""
    candidates: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        candidates.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    for address in candidates:
        if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0":
            continue
        with socket.socket() as s:
            try:
                s.bind((address, 0))
            except OSError:
                continue
        return address
    return None


WARNING = "beyond loopback, with no auth_token"


def test_beyond_loopback_without_a_token_warns_and_refuses_remote_quit(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip(
            "!!! this machine has no non-loopback address: remote quit NOT tried over a real"
            " socket (tests/unit/test_access.py checks it with fake peers) !!!"
        )
    kqs = server(tmp_path, beanstalkd, bind="0.0.0.0")
    try:
        wait_until(lambda: WARNING in kqs.log_tail(100_000), what="the warning")
        with Client(address, kqs.port) as remote:
            assert remote.call("ping") == "pong"
            with pytest.raises(RemoteError) as err:
                remote.call("quit")
            assert err.value.code == "forbidden" and "loopback" in err.value.message
            del err
        with Client("127.0.0.1", kqs.port) as local:
            assert local.call("quit") == "shutting down"
        assert kqs.proc is not None and kqs.proc.wait(20) == 0
    finally:
        kqs.kill()


def test_beyond_loopback_with_a_token_does_not_warn(
    tmp_path: Path, beanstalkd: BeanstalkdProcess
) -> None:
    kqs = server(tmp_path, beanstalkd, bind="0.0.0.0", auth_token=TOKEN)
    try:
        listening = "listening on 0.0.0.0"  # logged just after the warning would be
        wait_until(lambda: listening in kqs.log_tail(100_000), what="the listening line")
        assert WARNING not in kqs.log_tail(100_000)
    finally:
        kqs.kill()


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
