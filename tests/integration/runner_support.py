"""`kqs run` as a real child process, for the runner's integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kqs.client import Client
from tests.integration.runner_handlers import OUT_ENV
from tests.support import KqsProcess, kill_process, stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]
HANDLERS = "tests.integration.runner_handlers"


class RunnerProcess:
    """`python -m kqs run --jobs <file> --server ...` with handlers from tests/."""

    def __init__(
        self,
        workdir: Path,
        jobs_toml: str,
        servers: list[KqsProcess],
        out: Path,
        *,
        name: str = "runner",
        grace: float | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.jobs_path = workdir / f"{name}-jobs.toml"
        self.jobs_path.write_text(jobs_toml)
        self.log_path = workdir / f"{name}.log"
        self.servers = servers
        self.out = out
        self.grace = grace
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RunnerProcess:
        args = [sys.executable, "-m", "kqs", "run", "--jobs", str(self.jobs_path)]
        args += ["--log-level", "debug"]
        for server in self.servers:
            args += ["--server", f"127.0.0.1:{server.port}"]
        if self.grace is not None:
            args += ["--grace", str(self.grace)]
        args += self.args
        env = {**os.environ, OUT_ENV: str(self.out)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("KQS_SERVER", None)
        self.out.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, cwd=REPO)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        kill_process(self.proc)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit; return its status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; return the exit status."""
        return stop_process(self.proc, timeout)

    def __enter__(self) -> RunnerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def call(server: KqsProcess, method: str, params: Any = None, token: str | None = None) -> Any:
    with Client("127.0.0.1", server.port, timeout=10, token=token) as c:
        return c.call(method, params)


def type_stats(server: KqsProcess, type_: str) -> dict[str, Any]:
    types: dict[str, Any] = call(server, "stats").get("types", {})
    stats: dict[str, Any] = types.get(type_, {})
    return stats


def wait_watching(server: KqsProcess, type_: str, runners: int = 1, timeout: float = 20) -> None:
    """Wait until `runners` connections watch the tube of `type_` on `server`."""
    wait_until(
        lambda: type_stats(server, type_).get("runners", 0) >= runners,
        timeout=timeout,
        what=f"{runners} runner(s) watching {type_}",
    )


def wait_finished(server: KqsProcess, timeout: float = 60) -> None:
    """Wait until the server holds no unfinished live job (dead ones may remain)."""

    def done() -> bool:
        stats = call(server, "stats")
        return bool(stats["live_jobs"] == 0 and stats["pending"] == 0)

    wait_until(done, timeout=timeout, what="every job finished")
