"""A small synchronous client for the wire protocol (used by the CLI and tests)."""

from __future__ import annotations

import itertools
import socket
import ssl
from typing import Any

import orjson

from kqs.errors import KqsError


class RemoteError(KqsError):
    """An error reply from the server; `code` is the wire code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """One connection. With `tls`, the socket is wrapped (server name = `host`); with
    `token`, the connection authenticates first."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 14151,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock = tls.wrap_socket(sock, server_hostname=host) if tls is not None else sock
        except BaseException:
            sock.close()  # a failed handshake must not leave the socket open
            raise
        self.file = self.sock.makefile("rb")
        self._ids = itertools.count(1)
        if token:
            try:
                self.call("auth", {"token": token})
            except BaseException:
                self.close()  # nor a refused token
                raise

    def call(self, method: str, params: Any = None) -> Any:
        """Send one request and return its result, or raise RemoteError."""
        req_id = next(self._ids)
        request = {"id": req_id, "method": method, "params": {} if params is None else params}
        self.sock.sendall(orjson.dumps(request) + b"\n")
        line = self.file.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        reply = orjson.loads(line)
        if "error" in reply:
            err = reply["error"]
            raise RemoteError(err["code"], err["message"])
        return reply["result"]

    def insert(self, type_: str, data: Any = None, **fields: Any) -> str:
        ids: list[str] = self.call("insert", {"type": type_, "data": data, **fields})["ids"]
        return ids[0]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
