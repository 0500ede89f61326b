"""Shared parts of the fault-injection suite: the soak switch, the recorded figures, a
load generator of many concurrent asyncio clients that checks every answer, and the
Jepsen-style count (lost = acknowledged - executed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.support import KqsProcess

#: A file to which every fault test appends one JSON line of figures (scripts/reliability).
RESULTS_ENV = "KQS_RELIABILITY_RESULTS"

JOB_ID = re.compile(r"[A-Za-z0-9_.]{1,32}-[0-9a-f]{17}")


@dataclass
class Figures:
    """What a fault test records for the results table (one JSON line per test)."""

    scenario: str
    injected: str = ""
    acknowledged: int = 0
    lost: int = 0
    duplicated: int | None = None  # measured only where a runner runs; None is shown as "-"
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def count(self, acked: Collection[str], executed: Counter[str]) -> tuple[set[str], int]:
        """Record acknowledged, lost and duplicated runs; return (lost ids, duplicates)."""
        lost, dups = jepsen(acked, executed)
        self.acknowledged = len(acked)
        self.lost = len(lost)
        self.duplicated = dups
        return lost, dups


def jepsen(acked: Iterable[str], executed: Counter[str]) -> tuple[set[str], int]:
    """(acknowledged ids never executed, extra runs of executed jobs)."""
    lost = set(acked) - executed.keys()
    duplicated = sum(n - 1 for n in executed.values() if n > 1)
    return lost, duplicated


def all_of(*predicates: Callable[[], bool]) -> Callable[[], bool]:
    """A predicate true when every one of `predicates` is."""
    return lambda: all(p() for p in predicates)


def sample(ids: Iterable[str], n: int = 5) -> list[str]:
    return sorted(ids)[:n]


# --- a load generator --------------------------------------------------------------------


def default_job(client: int, seq: int) -> dict[str, Any]:
    return {"type": "fault", "data": {"c": client, "s": seq}}


@dataclass
class Violation:
    """An answer that is wrong (not merely an error): what was sent and what came back."""

    request: bytes
    reply: bytes
    why: str


class LoadGen:
    """`clients` concurrent asyncio connections to 127.0.0.1:`port`, in a thread of their
    own, each inserting in a loop: one job, or every `batch_every`-th request an array of
    `batch` jobs. Only a well-formed success reply acknowledges jobs (`acked`). A request
    that gets no reply (refused, reset, closed, no answer within `timeout`) is unknown: the
    client drops the connection, pauses briefly and connects again. Error replies are
    counted by code in `errors`; a code in `stop_on` ends that client. Every reply is
    checked: it must be one JSON line with the request's id and exactly one of result or
    error, and an insert's result must carry one well-formed id per job; anything else
    is a `Violation` (a wrong answer)."""

    def __init__(
        self,
        port: int,
        *,
        clients: int = 64,
        job: Callable[[int, int], dict[str, Any]] = default_job,
        batch_every: int = 5,
        batch: int = 10,
        timeout: float = 5.0,
        pause: float = 0.0,
        stop_on: Collection[str] = (),
    ) -> None:
        self.port = port
        self.clients = clients
        self.job = job
        self.batch_every = batch_every
        self.batch = batch
        self.timeout = timeout
        self.pause = pause
        self.stop_on = frozenset(stop_on)
        self.acked: list[str] = []
        self.errors: Counter[str] = Counter()
        self.violations: list[Violation] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_async: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="loadgen", daemon=True)
        self._started = threading.Event()

    # -- control (test thread) --------------------------------------------------------

    def start(self) -> LoadGen:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop every client (requests in flight are given up: unknown) and join."""
        self._stopping.set()
        loop, event = self._loop, self._stop_async
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("load generator did not stop")

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def reached(self, n: int) -> Callable[[], bool]:
        """A predicate: at least `n` jobs acknowledged."""
        return lambda: self.count() >= n

    def more(self, n: int) -> Callable[[], bool]:
        """A predicate: `n` more jobs acknowledged than now."""
        return self.reached(self.count() + n)

    def error_count(self, code: str) -> int:
        with self._lock:
            return self.errors[code]

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.acked)

    def __enter__(self) -> LoadGen:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the clients (loop thread) --------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        self._started.set()
        tasks = [asyncio.create_task(self._guarded(n)) for n in range(self.clients)]
        stopper = asyncio.create_task(self._stop_async.wait())
        everyone = asyncio.gather(*tasks, return_exceptions=True)
        waiting: set[asyncio.Future[Any]] = {stopper, everyone}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        stopper.cancel()
        await asyncio.gather(everyone, stopper, return_exceptions=True)

    async def _guarded(self, n: int) -> None:
        try:
            await self._client(n)
        except Exception as exc:  # a bug in the generator itself: make it visible
            with self._lock:
                self.violations.append(Violation(b"", b"", f"client {n} crashed: {exc!r}"))

    def _done(self) -> bool:
        return self._stopping.is_set()

    async def _client(self, n: int) -> None:
        seq = itertools.count(1)
        req_ids = itertools.count(1)
        pause = 0.02
        while not self._done():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), self.timeout
                )
            except (OSError, TimeoutError):
                self._count_error("connect")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
                continue
            pause = 0.02
            try:
                while not self._done():
                    i = next(seq)
                    jobs = (
                        [self.job(n, i * 1000 + k) for k in range(self.batch)]
                        if self.batch_every and i % self.batch_every == 0
                        else [self.job(n, i * 1000)]
                    )
                    rid = next(req_ids)
                    params: Any = jobs if len(jobs) > 1 else jobs[0]
                    line = orjson.dumps({"id": rid, "method": "insert", "params": params}) + b"\n"
                    writer.write(line)
                    with self._lock:
                        self.requests += 1
                    await asyncio.wait_for(writer.drain(), self.timeout)
                    reply = await asyncio.wait_for(reader.readline(), self.timeout)
                    code = self._check(line, reply, rid, len(jobs))
                    if code in self.stop_on:
                        return
                    if code in ("broken", "shutting_down"):
                        break
                    if code is not None:
                        await asyncio.sleep(0.05)  # an error reply: no hot loop
                    elif self.pause:
                        await asyncio.sleep(self.pause)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                self._count_error("connection")
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)
            await asyncio.sleep(pause)

    def _count_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def _check(self, request: bytes, reply: bytes, rid: int, jobs: int) -> str | None:
        """None for a success (ids recorded), else the error code ('broken': no whole
        reply line, i.e. unknown outcome)."""
        if not reply.endswith(b"\n"):
            self._count_error("connection")
            return "broken"
        try:
            obj = orjson.loads(reply)
        except orjson.JSONDecodeError:
            return self._wrong(request, reply, "not JSON")
        if not isinstance(obj, dict) or ("result" in obj) == ("error" in obj):
            return self._wrong(request, reply, "not a reply object")
        if obj.get("id") != rid:
            if obj.get("id") is None and "error" in obj:  # a last line before a close
                self._count_error(str(obj["error"].get("code")))
                return "broken"
            return self._wrong(request, reply, f"reply id {obj.get('id')!r} for request {rid}")
        if "error" in obj:
            err = obj["error"]
            if not isinstance(err, dict) or not isinstance(err.get("code"), str):
                return self._wrong(request, reply, "malformed error")
            self._count_error(err["code"])
            return str(err["code"])
        result = obj["result"]
        ids = result.get("ids") if isinstance(result, dict) else None
        if (
            not isinstance(ids, list)
            or len(ids) != jobs
            or not all(isinstance(i, str) and JOB_ID.fullmatch(i) for i in ids)
        ):
            return self._wrong(request, reply, "insert result is not one id per job")
        with self._lock:
            self.acked.extend(ids)
        return None

    def _wrong(self, request: bytes, reply: bytes, why: str) -> str:
        with self._lock:
            self.violations.append(Violation(request[:200], reply[:200], why))
            self.errors["wrong-answer"] += 1
        return "broken"


# --- small helpers -------------------------------------------------------------------------


def log_lines(server: KqsProcess, level: str, contains: str = "") -> list[str]:
    """Lines of the server's log at `level` (e.g. ERROR) containing `contains`."""
    if not server.log_path.exists():
        return []
    return [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if f" {level} " in line and contains in line
    ]


def wait_file_lines(path: Path, n: int, timeout: float = 30) -> None:
    """Poll until `path` has at least `n` lines."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not reach {n} lines in {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
