"""The one place where the parts are wired, started and stopped.

Start: data directory -> journal replay -> beanstalkd (embedded child or external)
-> feeder -> service -> RPC listener. Stop (SIGTERM, SIGINT or `quit`): refuse new
inserts, finish those in flight, give the feeder a moment to hand over what is queued,
flush and close the journal, stop the embedded beanstalkd, exit 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kqs.beanstalk import BeanstalkClient
from kqs.beanstalkd_proc import ManagedBeanstalkd
from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.config import ServerConfig
from kqs.errors import Unavailable
from kqs.feeder import FeedConnection, Feeder
from kqs.journal import Journal
from kqs.journal.diskio import OS_IO, DiskIO
from kqs.model import IdGenerator
from kqs.rpc.methods import Access
from kqs.rpc.server import Limits, RpcServer, tls_context
from kqs.service import Service
from kqs.store import open_store

log = logging.getLogger("kqs")

DRAIN_SECONDS = 10.0
FEED_ON_EXIT_SECONDS = 2.0


def node_name(config: ServerConfig, *, io: DiskIO = OS_IO) -> str:
    """The configured node name, or one made once and kept durably in the data
    directory (its file is written through `io`)."""
    if config.node:
        return config.node
    path = config.data_dir / "node"
    if path.exists():
        return path.read_text(encoding="ascii").strip()
    name = "n" + secrets.token_hex(4)
    write_durably(path, (name + "\n").encode("ascii"), io=io)
    return name


def write_durably(path: Path, data: bytes, *, io: DiskIO = OS_IO) -> None:
    """Replace `path` with `data` so that a crash at any moment leaves either the old
    file or the whole new one: write a temporary file, fsync it, rename it over `path`,
    then fsync the directory so the rename itself survives."""
    tmp = path.with_name(path.name + ".tmp")
    fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[io.write(fd, view) :]
        io.fsync(fd)
    finally:
        io.close(fd)
    io.rename(tmp, path)
    io.fsync_dir(path.parent)


def _warn_if_exposed(config: ServerConfig) -> None:
    """Log a loud warning when the server listens beyond loopback with no auth_token."""
    try:
        loopback = ipaddress.ip_address(config.bind).is_loopback
    except ValueError:
        loopback = config.bind == "localhost"
    if not loopback and not config.auth_token:
        log.warning(
            "!!! listening on %s, beyond loopback, with no auth_token: any host that"
            " reaches this port can insert and read jobs; set auth_token (and tls_cert)",
            config.bind,
        )


async def collect_orphans(service: Service, clock: Clock, interval: float) -> None:
    """Every `interval` seconds, delete this server's bulk payloads of no unfinished job
    that are older than the gc window (Service.gc)."""
    while True:
        await clock.sleep(interval)
        try:
            await service.gc()
        except Unavailable as exc:
            log.warning("orphan collection skipped: %s", exc.message)
        except Exception:  # a bug must not end collection for good: log, go on
            log.exception("orphan collection failed; trying again in %g s", interval)


async def serve(
    config: ServerConfig,
    *,
    clock: Clock = SYSTEM_CLOCK,
    ready: Callable[[int], None] | None = None,
) -> int:
    """Run the server until asked to stop; return the exit status."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    node = node_name(config)
    journal = Journal.open(config.data_dir / "journal", segment_bytes=config.segment_bytes)
    managed: ManagedBeanstalkd | None = None
    address = config.beanstalkd_address()
    if address is None:
        managed = ManagedBeanstalkd(
            binary=config.beanstalkd_binary,
            binlog_dir=config.data_dir / "beanstalkd",
            port=config.beanstalkd_port,
            max_job_size=config.max_job_size,
            clock=clock,
        )
        address = await managed.start()
    host, bport = address

    async def connect() -> FeedConnection:
        return await BeanstalkClient.connect(host, bport)

    store = open_store(config.bulk_url(), data_dir=config.data_dir)
    feeder = Feeder(
        journal,
        connect,
        clock,
        batch=config.feeder_batch,
        store=store,
        node=node,
        max_body=config.max_job_size,
    )
    feeder.load()
    service = Service(
        journal,
        feeder,
        IdGenerator(node, clock),
        clock,
        max_jobs_per_insert=config.max_jobs_per_insert,
        default_ttr=config.default_ttr,
        max_payload_bytes=config.max_payload_bytes,
        bulk_url=config.bulk_url(),
        gc_window=config.gc_window,
    )

    def beanstalkd_info() -> dict[str, Any]:
        info: dict[str, Any] = {"address": f"{host}:{bport}", "embedded": managed is not None}
        if managed is not None:
            info.update(pid=managed.pid, restarts=managed.restarts)
        return info

    service.beanstalkd_info = beanstalkd_info
    stop = asyncio.Event()
    server = RpcServer(
        service,
        request_shutdown=stop.set,
        limits=Limits(
            max_line=config.max_line_bytes,
            max_inflight=config.max_inflight_per_connection,
            max_connections=config.max_connections,
            idle_timeout=config.idle_timeout,
            line_timeout=config.line_timeout,
            write_timeout=config.write_timeout,
        ),
        access=Access(config.auth_token, config.admin_token),
        tls=tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None,
        clock=clock,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    feeder_task = asyncio.create_task(feeder.run(), name="feeder")
    gc_task = asyncio.create_task(collect_orphans(service, clock, config.gc_interval))
    try:
        port = await server.start(config.bind, config.port)
        _warn_if_exposed(config)
        log.info(
            "kqs node %s listening on %s:%d (beanstalkd %s:%d, data %s, %d unfinished jobs)",
            node,
            config.bind,
            port,
            host,
            bport,
            config.data_dir,
            len(journal.jobs),
        )
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("shutting down: draining in-flight requests")
        service.draining = True
        await server.stop_accepting()
        await server.wait_idle(DRAIN_SECONDS)
        await feeder.drain(FEED_ON_EXIT_SECONDS)
    finally:
        gc_task.cancel()
        feeder.stop()
        await feeder_task
        await store.close()
        server.close_connections()
        await journal.close()
        if managed is not None:
            await managed.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
