"""Sans-IO wire protocol: line framing, request parsing and reply encoding.

Nothing here touches a socket. `LineSplitter` turns received bytes into lines and
enforces the maximum line length; `parse_request` turns one line into a `Request` or
an `ErrorReply`; `encode_result` / `encode_error` make the reply lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from kqs.errors import InvalidParams, InvalidRequest, KqsError, LineTooLong, ParseError


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    method: str
    params: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: Any
    error: KqsError


class LineSplitter:
    """Split a byte stream into lines (without the newline).

    `feed` returns the complete lines received so far, and a LineTooLong error once a
    line longer than `max_line` bytes (complete or still growing) is seen: the caller
    answers the lines before it, then the error, and closes, since the rest of that
    line can no longer be framed safely.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[list[bytes], LineTooLong | None]:
        buf = self._buf
        start = len(buf)
        buf += data
        lines: list[bytes] = []
        begin = 0
        pos = buf.find(b"\n", start)
        while pos != -1:
            if pos - begin > self.max_line:
                return lines, self._too_long()
            lines.append(bytes(buf[begin:pos]))
            begin = pos + 1
            pos = buf.find(b"\n", begin)
        del buf[:begin]
        if len(buf) > self.max_line:
            return lines, self._too_long()
        return lines, None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _too_long(self) -> LineTooLong:
        self._buf.clear()
        return LineTooLong(
            f"request line longer than {self.max_line} bytes; send smaller requests"
            " (split arrays of jobs) or raise max_line_bytes; closing the connection"
        )


def parse_request(line: bytes) -> Request | ErrorReply:
    """Parse one request line. Never raises: a bad line becomes an ErrorReply."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return ErrorReply(
            None, ParseError(f"line is not valid UTF-8 JSON ({exc}); send one JSON object a line")
        )
    if not isinstance(obj, dict):
        return ErrorReply(
            None,
            InvalidRequest(
                'a request must be a JSON object like {"id": 1, "method": "ping", "params": {}}'
            ),
        )
    req_id = obj.get("id")
    if req_id is not None and (
        isinstance(req_id, bool) or not isinstance(req_id, str | int | float)
    ):
        return ErrorReply(None, InvalidRequest("'id' must be a string, a number or null"))
    method = obj.get("method")
    if not isinstance(method, str):
        return ErrorReply(req_id, InvalidRequest("'method' must be a string, e.g. \"insert\""))
    params = obj.get("params", {})
    if not isinstance(params, dict | list):
        return ErrorReply(req_id, InvalidRequest("'params' must be a JSON object or array"))
    extra = obj.keys() - {"id", "method", "params"}
    if extra:
        return ErrorReply(
            req_id,
            InvalidRequest(
                f"unknown request field(s) {', '.join(sorted(map(repr, extra)))};"
                " a request has id, method, params"
            ),
        )
    return Request(req_id, method, params)


def encode_result(req_id: Any, result: Any) -> bytes:
    """The reply line; a result orjson cannot encode (nested deeper than 254 levels)
    becomes an `invalid_params` error saying so."""
    try:
        return orjson.dumps({"id": req_id, "result": result}) + b"\n"
    except TypeError as exc:
        return encode_error(req_id, InvalidParams(f"the reply cannot be encoded: {exc}"))


def encode_error(req_id: Any, error: KqsError) -> bytes:
    return orjson.dumps({"id": req_id, "error": {"code": error.code, "message": error.message}}) + (
        b"\n"
    )
