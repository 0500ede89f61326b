"""Helpers for tests that start real servers: free ports and readiness polling."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: `KQS_SOAK=1`: long variants (more rounds, more clients, more examples).
SOAK = os.environ.get("KQS_SOAK") == "1"


def scaled(ci: int, soak: int) -> int:
    """`soak` under KQS_SOAK=1, else `ci`."""
    return soak if SOAK else ci


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` until it is true; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL (a crash) and reap, if it still runs."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> int:
    """SIGTERM and wait up to `timeout` s; past that SIGKILL it and raise TimeoutExpired
    (a server that does not stop on SIGTERM is a failure). Returns the exit status."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_process(proc)
            raise
    return proc.returncode


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def beanstalkd_binary() -> str:
    path = shutil.which("beanstalkd") or (
        "/usr/bin/beanstalkd" if Path("/usr/bin/beanstalkd").exists() else None
    )
    if path is None:
        raise RuntimeError("beanstalkd is not installed: apt-get install beanstalkd")
    return path


class BeanstalkdProcess:
    """A real beanstalkd on a free loopback port, optionally with a binlog directory."""

    def __init__(self, binlog_dir: Path | None = None, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binlog_dir = binlog_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [beanstalkd_binary(), "-l", self.host, "-p", str(self.port)]
        if self.binlog_dir is not None:
            self.binlog_dir.mkdir(parents=True, exist_ok=True)
            args += ["-b", str(self.binlog_dir)]
        self.proc = subprocess.Popen(args)
        wait_until(lambda: port_open(self.host, self.port), what=f"beanstalkd on {self.port}")

    def kill(self) -> None:
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc, 5)


class KqsProcess:
    """`kqs serve` as a real child process on a free port, with its own data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        beanstalkd: str = "embedded",
        prefix: Sequence[str] = (),
        **config: object,
    ) -> None:
        """`prefix`: a command the server is started through (e.g. `nsenter -t PID -m
        --`); it must exec the server in the same process, so `proc.pid` is the server's."""
        self.data_dir = data_dir
        self.prefix = list(prefix)
        self.port = free_port()
        self.config_path = data_dir.parent / f"{data_dir.name}.toml"
        lines = [f'beanstalkd = "{beanstalkd}"', 'log_level = "debug"']
        for key, value in config.items():
            lines.append(
                f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"'
            )
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(self) -> None:
        log = self.log_path.open("ab")
        args = [sys.executable, "-m", "kqs", "serve", "--config", str(self.config_path)]
        args += ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen([*self.prefix, *args], stdout=log, stderr=log)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kqs exited with {self.proc.returncode}: {self.log_tail()}")
            return port_open("127.0.0.1", self.port)

        wait_until(ready, timeout=20, what=f"kqs on {self.port}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def kill(self) -> None:
        kill_process(self.proc)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; return the exit status."""
        return stop_process(self.proc, timeout)
