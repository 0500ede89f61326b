"""Every error a client can see, with its stable wire code: the one error table.

A `KqsError` subclass carries a `code` (part of the wire contract, documented in
docs/protocol.md) and a message that says what to do. Anything else raised while
serving a request becomes `internal_error`, and the connection goes on.
"""

from __future__ import annotations


class KqsError(Exception):
    """Base of every error with a wire code."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ParseError(KqsError):
    code = "parse_error"


class InvalidRequest(KqsError):
    code = "invalid_request"


class MethodNotFound(KqsError):
    code = "method_not_found"


class InvalidParams(KqsError):
    code = "invalid_params"


class LineTooLong(KqsError):
    code = "line_too_long"


class PayloadTooLarge(KqsError):
    code = "payload_too_large"


class TooManyConnections(KqsError):
    code = "too_many_connections"


class Timeout(KqsError):
    """A connection broke a time limit (idle, slow line); it is closed."""

    code = "timeout"


class Unauthorized(KqsError):
    code = "unauthorized"


class Forbidden(KqsError):
    code = "forbidden"


class NotFound(KqsError):
    code = "not_found"


class JournalFailed(KqsError):
    """A journal write or fsync failed: nothing waiting on it was acknowledged."""

    code = "journal_failed"


class Unavailable(KqsError):
    """A dependency (e.g. the bulk store) cannot be reached just now."""

    code = "unavailable"


class DiskFull(KqsError):
    """The journal's disk is full: nothing of the request was written; finishing jobs
    still works, and inserts resume by themselves once space is freed."""

    code = "disk_full"


class ShuttingDown(KqsError):
    code = "shutting_down"


class InternalError(KqsError):
    code = "internal_error"


class ConfigError(Exception):
    """A configuration file or option is invalid; the message names the key."""


class BeanstalkdMissing(Exception):
    """The beanstalkd binary needed for the embedded default was not found."""


#: code -> class, for clients that turn a wire error back into an exception.
BY_CODE: dict[str, type[KqsError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        LineTooLong,
        PayloadTooLarge,
        TooManyConnections,
        Timeout,
        Unauthorized,
        Forbidden,
        NotFound,
        JournalFailed,
        DiskFull,
        Unavailable,
        ShuttingDown,
        InternalError,
    )
}
