"""The embedded default: kqs starts and supervises its own beanstalkd child.

`ManagedBeanstalkd.start` finds the binary, spawns it on a loopback port with its binlog in
kqs's data directory, and returns once it accepts connections. A supervising task then
restarts the child whenever it exits unexpectedly, on the same port and binlog directory,
with exponential backoff. beanstalkd is not kqs's system of record (the journal is), so a
restart only costs time: the feeder notices the new process and feeds again what was lost.

The child must not outlive kqs: a `kill -9` of kqs would otherwise leave it holding its
port and its binlog directory's lock. So it is started through util-linux `setpriv
--pdeathsig TERM` where available (the kernel then stops it when kqs dies), and its pid
is kept in `<binlog_dir>.pid`: a start finds a leftover child there and stops it first.

Waiting for readiness polls a TCP connect with short growing pauses, bounded in total; it
uses real time because it waits for a real process. Restart backoff uses the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from pathlib import Path

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.errors import BeanstalkdMissing

log = logging.getLogger(__name__)


class BeanstalkdStartError(Exception):
    """The beanstalkd child exited during start-up or did not accept connections in time."""


async def wait_ready(host: str, port: int, timeout: float) -> None:  # noqa: ASYNC109
    """Return once a TCP connect to host:port succeeds; TimeoutError after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.005
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                _, writer = await asyncio.open_connection(host, port)
        except OSError:
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        if loop.time() + pause > deadline:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} in {timeout}s")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


def pick_free_port(host: str) -> int:
    """A port the kernel has just reported free on `host` (another process may still take
    it before beanstalkd binds it; start-up then fails with beanstalkd's exit code)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


class ManagedBeanstalkd:
    """A supervised beanstalkd child process.

    `restarts` counts restarts that brought the child up again after an unexpected exit.
    """

    START_TIMEOUT = 10.0  # seconds for a child to accept connections
    STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
    BACKOFF_FIRST = 0.1  # seconds before the first restart after a crash
    BACKOFF_MAX = 30.0
    HEALTHY_AFTER = 60.0  # a child that ran this long resets the backoff

    def __init__(
        self,
        *,
        binary: str = "beanstalkd",
        binlog_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        max_job_size: int = 65535,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._binary = binary
        self._binlog_dir = binlog_dir
        self._host = host
        self._port = port
        self._max_job_size = max_job_size
        self._clock = clock
        self._path = ""  # the resolved binary, set by start()
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the child listens on; the port is fixed by `start`."""
        return self._host, self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> tuple[str, int]:
        """Start the child and its supervisor; return (host, port) once it accepts
        connections. Raises `BeanstalkdMissing` or `BeanstalkdStartError`."""
        if self._supervisor is not None:
            raise RuntimeError("ManagedBeanstalkd is already started")
        path = shutil.which(self._binary)
        if path is None:
            raise BeanstalkdMissing(
                f"beanstalkd binary {self._binary!r} not found: install it"
                " (Debian/Ubuntu: apt-get install beanstalkd), or set"
                ' beanstalkd = "host:port" in the config to use an external one'
            )
        self._path = path
        if self._port == 0:
            self._port = pick_free_port(self._host)
        self._stopping = False
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="beanstalkd-supervisor")
        log.info("beanstalkd started on %s:%d (pid %s)", self._host, self._port, self.pid)
        return self.address

    async def stop(self) -> None:
        """Stop supervising, then SIGTERM the child; SIGKILL it if it lingers."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            log.warning("beanstalkd (pid %d) ignored SIGTERM; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    @property
    def pidfile(self) -> Path:
        return self._binlog_dir.with_name(self._binlog_dir.name + ".pid")

    def _leftover_pid(self) -> int | None:
        """The pid in our pidfile if it is still a beanstalkd on our binlog directory."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        ours = str(self._binlog_dir).encode() in cmdline
        return pid if ours and any(arg.endswith(b"beanstalkd") for arg in cmdline) else None

    async def _stop_leftover(self) -> None:
        """Stop a beanstalkd left running on our binlog directory by an earlier kqs."""
        pid = self._leftover_pid()
        if pid is None:
            return
        log.warning("stopping beanstalkd (pid %d) left running by an earlier kqs", pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.STOP_TIMEOUT
        sig = signal.SIGTERM
        while _alive(pid):
            if loop.time() > deadline:
                sig = signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            await asyncio.sleep(0.01)

    def _command(self) -> list[str]:
        args = [
            self._path,
            "-l",
            self._host,
            "-p",
            str(self._port),
            "-b",
            str(self._binlog_dir),
            "-z",
            str(self._max_job_size),
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            args = [setpriv, "--pdeathsig", "TERM", "--", *args]
        return args

    async def _spawn(self) -> None:
        """Start one child and wait until it accepts connections."""
        await self._stop_leftover()
        self._binlog_dir.mkdir(parents=True, exist_ok=True)  # it may have been deleted
        proc = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
        )
        self.pidfile.write_text(f"{proc.pid}\n")
        self._proc = proc  # at once, so that stop() finds it even mid start-up
        ready = asyncio.create_task(wait_ready(self._host, self._port, self.START_TIMEOUT))
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, exited):
                task.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if proc.returncode is not None:
            raise BeanstalkdStartError(
                f"beanstalkd exited with code {proc.returncode} while starting"
                f" (port {self._port}, binlog {self._binlog_dir})"
            )
        if ready.cancelled() or ready.exception() is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise BeanstalkdStartError(
                f"beanstalkd did not accept connections on {self._host}:{self._port}"
                f" within {self.START_TIMEOUT}s"
            )

    async def _supervise(self) -> None:
        """Restart the child whenever it exits, with exponential backoff, until stopped."""
        backoff = self.BACKOFF_FIRST
        started = self._clock.monotonic()
        while not self._stopping and self._proc is not None:
            proc = self._proc
            code = await proc.wait()
            if self._stopping:
                return
            if self._clock.monotonic() - started >= self.HEALTHY_AFTER:
                backoff = self.BACKOFF_FIRST
            log.warning(
                "beanstalkd (pid %d) exited with code %d; restarting in %.1fs",
                proc.pid,
                code,
                backoff,
            )
            await self._clock.sleep(backoff)
            backoff = min(backoff * 2, self.BACKOFF_MAX)
            started = self._clock.monotonic()
            try:
                await self._spawn()
            except (OSError, BeanstalkdStartError) as exc:
                log.warning("beanstalkd restart failed: %s", exc)
                continue
            self.restarts += 1
            log.info("beanstalkd restarted on %s:%d (pid %s)", self._host, self._port, self.pid)
