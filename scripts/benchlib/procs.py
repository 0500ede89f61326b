"""The servers under test: kqs, a bare beanstalkd, redis-server; and /proc readings.

Every server listens on a free loopback port with its data in a temporary directory,
and every wait here is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
KQS = ROOT / ".venv" / "bin" / "kqs"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something the benchmark needs did not work (a server did not start, ...)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.02) -> float:
    """Call `check()` until it is truthy; return the seconds it took, or raise BenchError."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        with contextlib.suppress(OSError, BenchError):
            if check():
                return time.monotonic() - start
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """SIGTERM, wait (bounded), SIGKILL if needed; return the seconds until it exited."""
    start = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return time.monotonic() - start


def rpc(port: int, method: str, params: Any = None, timeout: float = 30.0) -> Any:
    """One kqs request on a fresh connection; the result, or BenchError for an error."""
    request = {"id": 1, "method": method, "params": {} if params is None else params}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(orjson.dumps(request) + b"\n")
        with sock.makefile("rb") as reader:
            line = reader.readline()
    if not line:
        raise BenchError(f"kqs closed the connection on {method}")
    reply = orjson.loads(line)
    if "error" in reply:
        raise BenchError(f"kqs {method}: {reply['error']}")
    return reply["result"]


@dataclass
class KqsServer:
    """`kqs serve` with its embedded beanstalkd; restartable on the same data directory."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait for the first successful ping; return the seconds that took."""
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        start = time.monotonic()
        self.proc = subprocess.Popen(
            [str(KQS), "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_until(self.ping, timeout, f"kqs on port {self.port}", interval=0.005)
        return time.monotonic() - start

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"kqs exited with {self.proc.returncode}; see {self.data_dir}.log")
        return bool(rpc(self.port, "ping", timeout=2.0) == "pong")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = rpc(self.port, "stats")
        return result

    def beanstalkd(self) -> tuple[str, int, int]:
        """host, port and pid of the embedded beanstalkd."""
        info = self.stats()["beanstalkd"]
        host, _, port = info["address"].rpartition(":")
        return host, int(port), int(info["pid"])

    def wait_fed(self, timeout: float) -> float:
        """Wait until nothing journaled is still waiting to be fed into beanstalkd."""

        def fed() -> bool:
            stats = self.stats()
            return stats["pending"] == 0 and not stats.get("verifying", False)

        return wait_until(fed, timeout, "kqs feeding beanstalkd", interval=0.05)

    def stop(self) -> float:
        """SIGTERM (graceful drain) and wait; return the seconds until it exited."""
        if self.proc is None:
            return 0.0
        seconds = stop_process(self.proc)
        self.proc = None
        return seconds


@dataclass
class Beanstalkd:
    """A bare beanstalkd without a binlog: acks before any disk write."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("beanstalkd")
        if binary is None:
            raise BenchError("beanstalkd is not installed (apt-get install beanstalkd)")
        self.proc = subprocess.Popen(
            [binary, "-l", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._accepts, 10.0, f"beanstalkd on port {self.port}")

    def _accepts(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
            return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10.0)
            self.proc = None


@dataclass
class Redis:
    """redis-server in a temporary directory; `durable` adds appendonly + appendfsync always."""

    data_dir: Path
    durable: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.data_dir), "--daemonize", "no", "--protected-mode", "yes"]
        if self.durable:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        log = (self.data_dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_until(self._pong, 10.0, f"redis-server on port {self.port}")

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30.0)
            self.proc = None
