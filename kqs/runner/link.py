"""A runner's link to one kqs server: `hello` (its node name and beanstalkd), the reporter
of finished jobs, and beanstalkd connections for the workers.

The beanstalkd address a server reports is as the server sees it: a loopback or wildcard
host there (its embedded beanstalkd) means the server's own host seen from here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Any

from kqs.beanstalk import DEFAULT_TUBE, BeanstalkClient
from kqs.clock import Clock
from kqs.config import parse_address
from kqs.errors import ConfigError
from kqs.runner.kqsrpc import KqsConnection, KqsUnavailable
from kqs.runner.reporter import Reporter

log = logging.getLogger("kqs.runner")

#: A `hello` younger than this is not asked again when several workers reconnect at once.
HELLO_REUSE_SECONDS = 1.0


def _local(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def beanstalkd_address(reported: str, server_host: str) -> tuple[str, int]:
    """Where to reach the beanstalkd a server reported (`host:port` as it sees it) from
    here, given the host we reach that server at. ValueError if it is not host:port."""
    try:
        host, port = parse_address(reported, key="beanstalkd")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if _local(host) and not _local(server_host):
        host = server_host
    return host, port


class ServerLink:
    """Everything the runner keeps per `--server`."""

    def __init__(
        self,
        address: str,
        clock: Clock,
        *,
        on_hello: Callable[[ServerLink], None] = lambda link: None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.host, self.port = parse_address(address, key="--server")
        self.rpc = KqsConnection(self.host, self.port, token=token, tls=tls)
        self.reporter = Reporter(address, self._send_finish, clock)
        self.node: str | None = None
        self.beanstalkd: tuple[str, int] | None = None
        self.bulk_url: str | None = None
        self._clock = clock
        self._on_hello = on_hello
        self._hello_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _send_finish(self, items: list[dict[str, Any]]) -> Any:
        return await self.rpc.call("finish", items)

    async def hello(self) -> tuple[str, int]:
        """Ask the server for its node name and beanstalkd address; return the address."""
        result = await self.rpc.call("hello")
        node = result.get("node") if isinstance(result, dict) else None
        reported = result.get("beanstalkd") if isinstance(result, dict) else None
        if not isinstance(node, str) or not isinstance(reported, str):
            raise KqsUnavailable(f"kqs at {self.address} answered hello with {result!r}")
        try:
            address = beanstalkd_address(reported, self.host)
        except ValueError as exc:
            raise KqsUnavailable(f"kqs at {self.address}: {exc}") from None
        if (node, address) != (self.node, self.beanstalkd):
            log.info("kqs %s is node %s, beanstalkd %s:%d", self.address, node, *address)
        bulk = result.get("bulk")
        self.node, self.beanstalkd = node, address
        self.bulk_url = bulk if isinstance(bulk, str) and bulk else None
        self._hello_at = self._clock.monotonic()
        self._on_hello(self)
        return address

    async def resolve(self, refresh: bool) -> tuple[str, int]:
        """The beanstalkd address, from the last `hello` unless `refresh` (then asked
        again, unless another worker just did)."""
        async with self._lock:
            stale = self._clock.monotonic() - self._hello_at > HELLO_REUSE_SECONDS
            if self.beanstalkd is None or (refresh and stale):
                return await self.hello()
            return self.beanstalkd

    async def connect(self, tube: str, refresh: bool) -> BeanstalkClient:
        """A beanstalkd connection watching only `tube`."""
        host, port = await self.resolve(refresh)
        client = await BeanstalkClient.connect(host, port)
        try:
            await client.watch(tube)
            if tube != DEFAULT_TUBE:
                await client.ignore(DEFAULT_TUBE)
        except BaseException:
            await client.close()
            raise
        return client

    async def close(self) -> None:
        await self.rpc.close()
