"""The runner process: wires links, workers and reporters; starts them and stops them.

One `ServerLink` per `--server`, one `TubeWorker` per (server, job type), one `Slots`
per job type (shared by its workers), and per Python job type one thread pool as large
as its concurrency, whose threads still in a handler given up on hold one of that type's
slots (kqs.runner.handlers.ThreadPool). Finished
jobs are reported to the server that owns them (the node named in the job id), or to the
server they were reserved through when no linked server has that node name.

Stopping (SIGTERM, the first SIGINT, or `request_stop()`): take no more jobs; let the
running ones finish for up to `grace` seconds; cancel what is still running and release
those jobs at once (delay 0, so another runner takes them); wait up to FLUSH_SECONDS for
the servers to acknowledge the reports of finished jobs (whose delete or bury follows the
acknowledgement); exit 0. Jobs whose report is not acknowledged by then stay reserved
until the connection closes at exit, and run again. A second SIGINT (or
`request_stop(immediate=True)`) skips the wait for running jobs and waits for reports one
second only; exit 130.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.model import owner_of
from kqs.runner.config import PythonTarget, RunnerConfig
from kqs.runner.handlers import Handler, ThreadPool, make_handler
from kqs.runner.lanes import Slots
from kqs.runner.link import ServerLink
from kqs.runner.payload import BulkStores
from kqs.runner.reporter import FinishItem
from kqs.runner.worker import TubeWorker, WorkConnection
from kqs.store import BulkStore

log = logging.getLogger("kqs.runner")

FLUSH_SECONDS = 10.0
IMMEDIATE_FLUSH_SECONDS = 1.0
EXIT_IMMEDIATE = 130


class Runner:
    """Runs the configured job types from every server until asked to stop."""

    def __init__(
        self,
        config: RunnerConfig,
        servers: Sequence[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        handlers: Mapping[str, Handler] | None = None,
        poll_interval: float = 0.05,
        flush_seconds: float = FLUSH_SECONDS,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Build everything (imports handlers: ConfigError naming the key if one fails).
        Call from inside the event loop that will run it."""
        if not servers:
            raise ValueError("at least one server is needed")
        self.config = config
        self.flush_seconds = flush_seconds
        self.slots = {name: Slots(t.concurrency) for name, t in config.types.items()}
        self.pools = {
            name: ThreadPool(t.concurrency, name=name, hold=self.slots[name].hold)
            for name, t in config.types.items()
            if isinstance(t.handler, PythonTarget)
        }
        self.handlers = (
            dict(handlers)
            if handlers is not None
            else {name: make_handler(t, self.pools.get(name)) for name, t in config.types.items()}
        )
        self.links = [
            ServerLink(s, clock, on_hello=self._hello, token=token, tls=tls)
            for s in dict.fromkeys(servers)
        ]
        self._by_node: dict[str, ServerLink] = {}
        self.bulk_stores = BulkStores()
        self.workers = [
            TubeWorker(
                t,
                self.handlers[name],
                self.slots[name],
                partial(self._connect, link, name),
                partial(self._report, link),
                name=f"{name}@{link.address}",
                bulk=partial(self._bulk_for, link),
                poll_interval=poll_interval,
            )
            for link in self.links
            for name, t in config.types.items()
        ]
        self._stop = asyncio.Event()
        self._immediate = asyncio.Event()

    # -- wiring ----------------------------------------------------------------------

    def _hello(self, link: ServerLink) -> None:
        if link.node is not None:
            other = self._by_node.get(link.node)
            if other is not None and other is not link:
                log.warning(
                    "kqs %s and %s both say they are node %s",
                    other.address,
                    link.address,
                    link.node,
                )
            self._by_node[link.node] = link

    async def _connect(self, link: ServerLink, tube: str, refresh: bool) -> WorkConnection:
        return await link.connect(tube, refresh)

    def _bulk_for(self, link: ServerLink, job_id: str) -> BulkStore:
        """The bulk store of the job's owner (else of the server it came through)."""
        owner = self._by_node.get(owner_of(job_id), link)
        if owner.bulk_url is None:
            raise ValueError(f"kqs {owner.address} named no bulk store in its hello")
        return self.bulk_stores.get(owner.bulk_url)

    def _report(self, link: ServerLink, item: FinishItem) -> None:
        """Queue a report with the job's owner (else the server it came through)."""
        self._by_node.get(owner_of(item.id), link).reporter.add(item)

    # -- control ---------------------------------------------------------------------

    def request_stop(self, immediate: bool = False) -> None:
        """Begin a graceful stop; `immediate` also skips waiting for running jobs."""
        if immediate:
            self._immediate.set()
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGINT and self._stop.is_set():
            log.warning("second SIGINT: stopping now, releasing running jobs")
            self.request_stop(immediate=True)
        else:
            log.info(
                "%s: stopping after the running jobs (grace %g s)", sig.name, self.config.grace
            )
            self.request_stop()

    @property
    def running(self) -> int:
        return sum(w.running for w in self.workers)

    @property
    def threads_busy(self) -> int:
        """Threads of every type's pool still in a sync handler."""
        return sum(pool.busy for pool in self.pools.values())

    async def run(self, *, handle_signals: bool = True) -> int:
        """Run until stopped; return the exit status (0, or 130 after an immediate stop)."""
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig)
        reporters = [
            asyncio.create_task(link.reporter.run(), name=f"report {link.address}")
            for link in self.links
        ]
        workers = [asyncio.create_task(w.run(), name=w.name) for w in self.workers]
        log.info(
            "running %s from %s",
            ", ".join(f"{n} (x{t.concurrency})" for n, t in self.config.types.items()),
            ", ".join(link.address for link in self.links),
        )
        try:
            await self._stop.wait()
            for w in self.workers:
                w.stop_reserving()
            if self.running:
                log.info(
                    "waiting up to %g s for %d running job(s)", self.config.grace, self.running
                )
            await self._wait(workers, self.config.grace)
            running = sum(w.in_handler for w in self.workers)
            if running:
                log.warning("releasing %d job(s) still running", running)
            for w in self.workers:
                w.abort()
            await self._wait(workers, self._flush_seconds(), immediate_stops=False)
            self._say_unreported()
            for w in self.workers:
                w.abandon()
            await asyncio.gather(*workers)
        finally:
            for task in (*reporters, *workers):
                task.cancel()
            await asyncio.gather(*reporters, *workers, return_exceptions=True)
            for link in self.links:
                await link.close()
            await self.bulk_stores.close()
            for pool in self.pools.values():
                pool.shutdown()
            for sig in sigs:
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return EXIT_IMMEDIATE if self._immediate.is_set() else 0

    async def _wait(
        self, tasks: list[asyncio.Task[None]], seconds: float, *, immediate_stops: bool = True
    ) -> None:
        """Wait until `tasks` are done or `seconds` pass (or, if `immediate_stops`, an
        immediate stop is asked for)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        pending: set[asyncio.Future[Any]] = set(tasks)
        immediate = asyncio.ensure_future(self._immediate.wait())
        try:
            while pending and not (immediate_stops and self._immediate.is_set()):
                left = deadline - loop.time()
                if left <= 0:
                    break
                waiting = pending | {immediate} if immediate_stops else pending
                done, _ = await asyncio.wait(
                    waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            immediate.cancel()

    def _flush_seconds(self) -> float:
        return IMMEDIATE_FLUSH_SECONDS if self._immediate.is_set() else self.flush_seconds

    def _say_unreported(self) -> None:
        """Log the reports no server acknowledged in time (those jobs run again)."""
        for link in self.links:
            if link.reporter.pending:
                log.error(
                    "kqs %s: %d finished job(s) could not be reported (%s); they go back to"
                    " beanstalkd and run again",
                    link.address,
                    link.reporter.pending,
                    link.reporter.stats.last_error,
                )
