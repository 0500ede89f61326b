"""asyncio I/O for the wire protocol: accept, read lines, dispatch, write replies.

Each request runs as its own task, so replies to pipelined requests go out in order of
completion (each carries its request's id). A connection with too many requests in
flight, or whose replies the client does not read, stops being read until it catches
up. Nothing a client sends escapes as an exception: every failure becomes an error
reply, and only an over-long line closes the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, cast

from kqs.errors import InternalError, KqsError, MethodNotFound
from kqs.rpc.methods import METHODS, Caller
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


def _is_loopback(peer: Any) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


class Connection(asyncio.Protocol):
    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.splitter = LineSplitter(server.max_line)
        self.transport: asyncio.Transport | None = None
        self.caller = Caller("?", False, server.request_shutdown)
        self.inflight = 0
        self.read_paused = False
        self.write_paused = False
        self.closing = False

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.caller = Caller(str(peer), _is_loopback(peer), self.server.request_shutdown)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        lines, overflow = self.splitter.feed(data)
        self.lines(lines)
        if overflow is not None:
            self.send(encode_error(None, overflow))
            self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    # -- requests --------------------------------------------------------------------

    def lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if not line.strip():
                continue
            parsed = parse_request(line)
            if isinstance(parsed, ErrorReply):
                self.send(encode_error(parsed.id, parsed.error))
                continue
            handler = METHODS.get(parsed.method)
            if handler is None:
                names = ", ".join(sorted(METHODS))
                self.send(
                    encode_error(
                        parsed.id,
                        MethodNotFound(f"unknown method {parsed.method!r}; methods are {names}"),
                    )
                )
                continue
            self.inflight += 1
            call = handler(self.server.service, parsed.params, self.caller)
            task = asyncio.ensure_future(self.run(parsed, call))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
        self._update_reading()

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
            try:
                reply = encode_result(req.id, result)
            except TypeError as exc:
                reply = encode_error(req.id, InternalError(f"reply could not be encoded: {exc}"))
        finally:
            self.inflight -= 1
        self.send(reply)
        self._update_reading()

    # -- I/O helpers -----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        should_pause = self.write_paused or self.inflight >= self.server.max_inflight
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
        max_line: int,
        max_inflight: int,
        request_shutdown: Callable[[], None],
    ) -> None:
        self.service = service
        self.max_line = max_line
        self.max_inflight = max_inflight
        self.request_shutdown = request_shutdown
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; return the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True
        )
        sock = self._server.sockets[0]
        bound: int = sock.getsockname()[1]
        return bound

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_idle(self, within: float) -> None:
        """Wait until no request is in flight, at most `within` seconds."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=within)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()
