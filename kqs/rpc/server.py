"""asyncio I/O for the wire protocol: accept, read lines, dispatch, write replies.

Each request runs as its own task, so replies to pipelined requests go out in order of
completion (each carries its request's id). Lines are checked for access in arrival
order, and `auth` (an inline method) runs before the next line is looked at, so each
request sees the access level every earlier request on its connection left. A
connection with too many requests in flight, or whose replies the client does not
read, stops being read until it catches up. Nothing a client sends escapes as an
exception: every failure becomes an error reply. A connection is closed, with a last
error line saying why, when its line is too long, when there are already
`max_connections`, when it sits idle past `idle_timeout`, when a line stays unfinished
past `line_timeout` (slow clients), when its replies go unread past `write_timeout`, or
after a wrong token (nothing after it on the connection is run).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from kqs.clock import SYSTEM_CLOCK, Clock
from kqs.errors import (
    InternalError,
    KqsError,
    MethodNotFound,
    Timeout,
    TooManyConnections,
    Unauthorized,
)
from kqs.rpc.methods import INLINE, METHODS, Access, Caller, Handler, InlineHandler, require
from kqs.rpc.protocol import (
    ErrorReply,
    LineSplitter,
    Request,
    encode_error,
    encode_result,
    parse_request,
)
from kqs.service import Service

log = logging.getLogger("kqs.rpc")


@dataclass(frozen=True, slots=True)
class Limits:
    max_line: int = 17 * 2**20
    max_inflight: int = 1024
    max_connections: int = 4096
    idle_timeout: float = 300.0
    line_timeout: float = 30.0
    write_timeout: float = 60.0


def _is_loopback(peer: Any) -> bool:
    """True if a peer address (a socket's peername) is loopback, an IPv4 loopback
    address seen through a dual-stack IPv6 socket (::ffff:127.x.y.z) included."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class Connection(asyncio.Protocol):
    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.splitter = LineSplitter(server.limits.max_line)
        self.transport: asyncio.Transport | None = None
        access = server.access
        self.caller = Caller("?", False, server.request_shutdown, access, access.initial())
        self.inflight = 0
        self.read_paused = False
        self.write_paused_at: float | None = None
        self.last_activity = server.clock.monotonic()
        self.partial_since: float | None = None
        self.closing = False

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.caller.peer = str(peer)
        self.caller.loopback = _is_loopback(peer)
        if len(self.server.connections) >= self.server.limits.max_connections:
            self.refuse(
                TooManyConnections(
                    f"the server has {len(self.server.connections)} connections, its limit;"
                    " retry later or use another server"
                )
            )
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        now = self.server.clock.monotonic()
        self.last_activity = now
        lines, overflow = self.splitter.feed(data)
        self.lines(lines)
        if overflow is not None:
            self.refuse(overflow)
            return
        if self.splitter.buffered == 0:
            self.partial_since = None
        elif lines or self.partial_since is None:
            self.partial_since = now

    def pause_writing(self) -> None:
        self.write_paused_at = self.server.clock.monotonic()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused_at = None
        self._update_reading()

    # -- requests --------------------------------------------------------------------

    def lines(self, lines: list[bytes]) -> None:
        """Dispatch complete lines in arrival order; stop once the connection closes
        (a wrong token: nothing after it is run or answered)."""
        for line in lines:
            if self.closing:
                break
            if line.strip():
                self.request(line)
        self._update_reading()

    def request(self, line: bytes) -> None:
        """Parse one line and answer it with an error, run it inline, or start its task.
        The access check uses the caller's level as left by every earlier line."""
        parsed = parse_request(line)
        if isinstance(parsed, ErrorReply):
            self.send(encode_error(parsed.id, parsed.error))
            return
        entry = METHODS.get(parsed.method)
        if entry is None:
            names = ", ".join(sorted(METHODS))
            error = MethodNotFound(f"unknown method {parsed.method!r}; methods are {names}")
            self.send(encode_error(parsed.id, error))
            return
        handler, level = entry
        try:
            require(self.caller, level, parsed.method)
        except KqsError as exc:
            self.send(encode_error(parsed.id, exc))
            return
        inline = INLINE.get(parsed.method)
        if inline is not None:
            self.run_inline(parsed, inline)
        else:
            self.start(parsed, handler)

    def run_inline(self, req: Request, handler: InlineHandler) -> None:
        """Run a method that needs no I/O now and send its reply. A wrong `auth` token
        closes the connection after its reply: no second guess on it."""
        try:
            reply = encode_result(req.id, handler(req.params, self.caller))
        except KqsError as exc:
            if req.method == "auth" and exc.code == Unauthorized.code:
                self.refuse(exc, req.id)
                return
            reply = encode_error(req.id, exc)
        except Exception:
            log.exception("method %s failed", req.method)
            reply = encode_error(
                req.id, InternalError(f"{req.method} failed inside the server; see its log")
            )
        self.send(reply)

    def start(self, req: Request, handler: Handler) -> None:
        """Start `req`; a handler may refuse it at once (KqsError), before it runs."""
        try:
            call = handler(self.server.service, req.params, self.caller)
        except KqsError as exc:
            self.send(encode_error(req.id, exc))
            return
        self.inflight += 1
        task = asyncio.ensure_future(self.run(req, call))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def run(self, req: Request, call: Any) -> None:
        try:
            result = await call
        except KqsError as exc:
            reply = encode_error(req.id, exc)
        except Exception:
            log.exception("method %s failed", req.method)
            reply = encode_error(
                req.id, InternalError(f"{req.method} failed inside the server; see its log")
            )
        else:
            reply = encode_result(req.id, result)
        finally:
            self.inflight -= 1
            self.last_activity = self.server.clock.monotonic()
        self.send(reply)
        self._update_reading()

    # -- I/O helpers -----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def refuse(self, error: KqsError, req_id: Any = None) -> None:
        """Send a last error line and close the connection."""
        self.send(encode_error(req_id, error))
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def check_timeouts(self, now: float) -> None:
        """Close this connection if it broke a time limit (called by the server's sweep)."""
        limits = self.server.limits
        if self.write_paused_at is not None and now - self.write_paused_at > limits.write_timeout:
            log.info("closing %s: replies unread for %.0fs", self.caller.peer, limits.write_timeout)
            if self.transport is not None:
                self.transport.abort()  # its buffer is full: a last line could not go out
            return
        if self.partial_since is not None and now - self.partial_since > limits.line_timeout:
            self.refuse(Timeout(f"a request line took over {limits.line_timeout:.0f}s to arrive"))
        elif self.inflight == 0 and now - self.last_activity > limits.idle_timeout:
            self.refuse(Timeout(f"idle for over {limits.idle_timeout:.0f}s; reconnect when needed"))

    def _update_reading(self) -> None:
        """Pause reading while too many requests are in flight or replies go unread;
        resume when neither holds. (Twice per request: the no-change case is first.)"""
        should_pause = (
            self.write_paused_at is not None or self.inflight >= self.server.limits.max_inflight
        )
        if should_pause is self.read_paused:
            return
        if self.transport is None or self.transport.is_closing():
            return
        if should_pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not should_pause and self.read_paused:
            self.transport.resume_reading()
            self.read_paused = False


class RpcServer:
    def __init__(
        self,
        service: Service,
        *,
        request_shutdown: Callable[[], None],
        limits: Limits | None = None,
        access: Access | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.service = service
        self.request_shutdown = request_shutdown
        self.limits = limits or Limits()
        self.access = access or Access()
        self.tls = tls
        self.clock = clock
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; return the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, ssl=self.tls
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="rpc-timeouts")
        sock = self._server.sockets[0]
        bound: int = sock.getsockname()[1]
        return bound

    async def _sweep(self) -> None:
        """Check every connection's time limits a few times per shortest limit."""
        limits = self.limits
        every = max(0.05, min(limits.idle_timeout, limits.line_timeout, limits.write_timeout) / 4)
        while True:
            await self.clock.sleep(min(every, 1.0))
            now = self.clock.monotonic()
            for conn in list(self.connections):
                conn.check_timeouts(now)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def wait_idle(self, within: float) -> None:
        """Wait until no request is in flight, at most `within` seconds."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=within)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM certificate-chain and key files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
