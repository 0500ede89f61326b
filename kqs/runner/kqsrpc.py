"""An asyncio client for the kqs wire protocol (docs/protocol.md), as the runner needs it.

One connection per server, opened on first use and again after a failure (or after the
server closed it for being idle); with a token, each new connection sends `auth` first;
with an SSL context, it is TLS. Requests are pipelined and replies matched by id. A call
that gets an error reply raises `kqs.client.RemoteError` (the connection stays usable);
a call that cannot get a reply (refused, closed, silent past `timeout`) raises
`KqsUnavailable`, the connection is dropped and the next call connects afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from typing import Any

import orjson

from kqs.client import RemoteError

#: Longest reply line accepted (a `dead` listing can be large).
MAX_REPLY_LINE = 64 * 2**20


class KqsUnavailable(Exception):
    """No reply from a kqs server: it is unreachable, closed the connection, or is silent.
    `code` is the error code the server closed the connection with, if it said one
    (`line_too_long`)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Link:
    """One open connection: the writer, the calls waiting for replies, and its reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.closed = False
        self.task = asyncio.create_task(self._read(), name="kqs-rpc-reader")

    async def _read(self) -> None:
        """Resolve waiting calls from reply lines until the connection ends; then fail the
        rest with KqsUnavailable."""
        reason = "the server closed the connection"
        code: str | None = None
        try:
            while line := await self.reader.readline():
                reply = orjson.loads(line)
                future = self.waiting.pop(reply.get("id"), None)
                if future is None or future.done():
                    if reply.get("id") is None and "error" in reply:
                        err = reply["error"]
                        code = str(err.get("code"))
                        reason = f"{code}: {err.get('message')}"
                        break
                    continue
                if "error" in reply:
                    err = reply["error"]
                    future.set_exception(RemoteError(str(err["code"]), str(err["message"])))
                else:
                    future.set_result(reply.get("result"))
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            reason = repr(exc)
        self.fail(reason, code)

    def fail(self, reason: str, code: str | None = None) -> None:
        """Close the connection; every waiting call raises KqsUnavailable(reason, code)."""
        self.closed = True
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(KqsUnavailable(reason, code))
        self.waiting.clear()
        self.writer.close()


class KqsConnection:
    """A lazily connected, pipelining connection to one kqs server."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.token = token
        self.tls = tls
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _connected(self) -> _Link:
        """The open connection, opening (and authenticating) one if there is none."""
        async with self._connecting:
            if self._link is None or self._link.closed:
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        reader, writer = await asyncio.open_connection(
                            self.host,
                            self.port,
                            limit=MAX_REPLY_LINE,
                            ssl=self.tls,
                            server_hostname=self.host if self.tls is not None else None,
                        )
                except (OSError, TimeoutError) as exc:
                    raise KqsUnavailable(
                        f"cannot connect to kqs at {self.address}: {exc!r}"
                    ) from exc
                link = _Link(reader, writer)
                if self.token:
                    await self._request(link, "auth", {"token": self.token})
                self._link = link
            return self._link

    async def call(self, method: str, params: Any = None) -> Any:
        """Send one request and return its result; RemoteError for an error reply,
        KqsUnavailable when no reply comes (the connection is then dropped)."""
        return await self._request(await self._connected(), method, params)

    async def _request(self, link: _Link, method: str, params: Any) -> Any:
        req_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.waiting[req_id] = future
        request = {"id": req_id, "method": method, "params": {} if params is None else params}
        try:
            link.writer.write(orjson.dumps(request) + b"\n")
            async with asyncio.timeout(self.timeout):
                await link.writer.drain()
                return await future
        except TimeoutError:
            link.fail(f"no reply from kqs at {self.address} within {self.timeout:g} s")
            raise KqsUnavailable(f"no reply from kqs at {self.address}") from None
        except (OSError, RuntimeError) as exc:
            link.fail(repr(exc))
            raise KqsUnavailable(f"kqs at {self.address}: {exc!r}") from exc
        finally:
            link.waiting.pop(req_id, None)

    async def close(self) -> None:
        """Close the connection, if open; waiting calls raise KqsUnavailable."""
        link, self._link = self._link, None
        if link is not None:
            link.fail("closed by the client")
            link.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await link.task
            with contextlib.suppress(OSError):
                await link.writer.wait_closed()
