"""The beanstalkd protocol, sans-IO: values, errors, command encoding, reply parsing.

Nothing here touches a socket; `kqs.beanstalk.client` does the I/O. The file reads top
to bottom:

- values: `Reply`, `PutItem`, `PutResult`, `ReservedJob`, `DEADLINE_SOON`;
- errors: `BeanstalkUnavailable` (the connection is gone) and `BeanstalkError`, with one
  subclass per error status in the one table `ERRORS`;
- command encoding: `cmd_*` functions that validate every argument, so that nothing sent
  can be misread by the server (a stray space or CRLF would shift every later reply);
- `ReplyParser`: bytes in, `Reply` values out;
- decoders: one `Reply` -> the value a method returns, or an exception.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast

from kqs.model import TUBE_RE

T = TypeVar("T")

DEFAULT_TUBE: Final = "default"
MAX_UINT32: Final = 2**32 - 1
MAX_UINT64: Final = 2**64 - 1
#: Longest reply line accepted, CRLF excluded; beanstalkd's longest is about 210 bytes.
MAX_LINE: Final = 1024
#: Largest body accepted in a reply: beanstalkd's own ceiling for `-z`.
MAX_BODY: Final = 2**30
DEFAULT_OP_TIMEOUT: Final = 10.0


log = logging.getLogger("kqs.beanstalk")

# --- values ------------------------------------------------------------------------------


class Reply(NamedTuple):
    """One reply: status word, the words after it, and the body that follows some replies.

    (The small values made once per command are NamedTuples: immutable, and several times
    cheaper to make than frozen dataclasses.)"""

    status: str
    args: tuple[str, ...] = ()
    body: bytes | None = None


PutStatus = Literal[
    "INSERTED", "BURIED", "JOB_TOO_BIG", "DRAINING", "OUT_OF_MEMORY", "EXPECTED_CRLF"
]
PUT_STATUSES: Final[frozenset[str]] = frozenset(
    {"INSERTED", "BURIED", "JOB_TOO_BIG", "DRAINING", "OUT_OF_MEMORY", "EXPECTED_CRLF"}
)


class PutItem(NamedTuple):
    """One job for `put_batch`: the tube to put it on and beanstalkd's put arguments."""

    tube: str
    body: bytes
    prio: int
    delay: int
    ttr: int


class PutResult(NamedTuple):
    """The outcome of one put. INSERTED and BURIED (the server ran out of memory growing a
    priority queue and buried the job) carry the job id; the other statuses carry none and
    mean the job is not in beanstalkd. The caller decides what to do; nothing is raised."""

    status: PutStatus
    id: int | None = None

    @property
    def inserted(self) -> bool:
        return self.status == "INSERTED"


@dataclass(frozen=True, slots=True)
class ReservedJob:
    id: int
    body: bytes


class DeadlineSoon(enum.Enum):
    """The type of `DEADLINE_SOON`."""

    DEADLINE_SOON = "DEADLINE_SOON"


#: What `reserve` returns for DEADLINE_SOON: a job reserved on this connection is within a
#: second of its TTR. Not `None`, because reserving again at once gets the same answer
#: until that job is touched, deleted, released, buried or times out.
DEADLINE_SOON: Final = DeadlineSoon.DEADLINE_SOON


# --- errors ------------------------------------------------------------------------------


class BeanstalkUnavailable(Exception):
    """The connection to beanstalkd is unusable: refused, closed, silent past a deadline or
    out of step. Pending and later calls on the client raise it; `__cause__` says why.

    `partial` holds the values of the replies a pipelined call got before the connection
    broke (in order; for `put_batch`, the PutResults of its first puts): those commands
    took effect, and the rest may or may not have."""

    def __init__(self, message: str, partial: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.partial = list(partial)


class MalformedReply(Exception):
    """The server sent bytes that are not a beanstalkd reply; the stream cannot be framed."""


class BeanstalkError(Exception):
    """beanstalkd answered a command with an error status, held in `status`."""

    status: str = ""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or f"beanstalkd answered {self.status}")


class BadFormatError(BeanstalkError):
    status = "BAD_FORMAT"


class UnknownCommandError(BeanstalkError):
    status = "UNKNOWN_COMMAND"


class ExpectedCrlfError(BeanstalkError):
    status = "EXPECTED_CRLF"


class InternalServerError(BeanstalkError):
    status = "INTERNAL_ERROR"


class OutOfMemoryError(BeanstalkError):
    status = "OUT_OF_MEMORY"


class DrainingError(BeanstalkError):
    status = "DRAINING"


class JobTooBigError(BeanstalkError):
    status = "JOB_TOO_BIG"


class NotIgnoredError(BeanstalkError):
    """`ignore` of the only watched tube."""

    status = "NOT_IGNORED"


class NotFoundError(BeanstalkError):
    status = "NOT_FOUND"


class BuriedError(BeanstalkError):
    """`release` ran the server out of memory: the job was buried instead."""

    status = "BURIED"


class UnexpectedReply(BeanstalkError):
    """A reply that is not a possible answer to its command (the connection is broken)."""

    def __init__(self, reply: Reply, expected: str) -> None:
        self.status = reply.status
        self.reply = reply
        got = " ".join((reply.status, *reply.args))
        super().__init__(f"beanstalkd answered {got!r}, expected {expected}")


#: status -> exception, for every status that is an error where a command does not
#: return it as an outcome. Any other unexpected status raises `UnexpectedReply`.
ERRORS: Final[dict[str, type[BeanstalkError]]] = {
    cls.status: cls
    for cls in (
        BadFormatError,
        UnknownCommandError,
        ExpectedCrlfError,
        InternalServerError,
        OutOfMemoryError,
        DrainingError,
        JobTooBigError,
        NotIgnoredError,
        NotFoundError,
        BuriedError,
    )
}

#: Statuses after which the server may have misread the stream: delivered, then the
#: connection is broken.
DESYNC_STATUSES: Final = frozenset({"BAD_FORMAT", "UNKNOWN_COMMAND", "EXPECTED_CRLF"})


def error_for(reply: Reply, expected: str) -> BeanstalkError:
    """The exception for a reply that is not a success of its command."""
    cls = ERRORS.get(reply.status)
    return cls() if cls is not None else UnexpectedReply(reply, expected)


# --- command encoding --------------------------------------------------------------------


def _uint(value: int, name: str, high: int = MAX_UINT32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{name} must be an integer from 0 to {high}, not {value!r}")
    return value


def _tube(name: str) -> bytes:
    if not isinstance(name, str) or TUBE_RE.fullmatch(name) is None:
        raise ValueError(
            f"tube name {name!r} must be 1-200 characters of A-Z a-z 0-9 - + / ; . $ _ ( ),"
            " not starting with '-'"
        )
    return name.encode("ascii")


def cmd_put(body: bytes, *, prio: int, delay: int, ttr: int) -> bytes:
    if not isinstance(body, bytes):
        raise TypeError(f"a job body must be bytes, not {type(body).__name__}")
    return b"put %d %d %d %d\r\n%b\r\n" % (
        _uint(prio, "prio"),
        _uint(delay, "delay"),
        _uint(ttr, "ttr"),
        len(body),
        body,
    )


def cmd_use(tube: str) -> bytes:
    return b"use %b\r\n" % _tube(tube)


def cmd_watch(tube: str) -> bytes:
    return b"watch %b\r\n" % _tube(tube)


def cmd_ignore(tube: str) -> bytes:
    return b"ignore %b\r\n" % _tube(tube)


def cmd_stats_tube(tube: str) -> bytes:
    return b"stats-tube %b\r\n" % _tube(tube)


def cmd_reserve(timeout: int) -> bytes:
    return b"reserve-with-timeout %d\r\n" % _uint(timeout, "timeout")


def cmd_job(verb: Literal["peek", "delete", "touch", "kick-job", "stats-job"], id: int) -> bytes:
    return b"%b %d\r\n" % (verb.encode("ascii"), _uint(id, "job id", MAX_UINT64))


def cmd_release(id: int, *, prio: int, delay: int) -> bytes:
    return b"release %d %d %d\r\n" % (
        _uint(id, "job id", MAX_UINT64),
        _uint(prio, "prio"),
        _uint(delay, "delay"),
    )


def cmd_bury(id: int, *, prio: int) -> bytes:
    return b"bury %d %d\r\n" % (_uint(id, "job id", MAX_UINT64), _uint(prio, "prio"))


CMD_STATS: Final = b"stats\r\n"
CMD_LIST_TUBES: Final = b"list-tubes\r\n"


# --- reply parsing -----------------------------------------------------------------------

# A status word, then words of printable ASCII, one space apart.
_LINE_RE: Final = re.compile(rb"[A-Z_]+(?: [\x21-\x7e]+)*")
#: Replies followed by a body: how many words follow the status (the last is the size).
_BODY_REPLIES: Final = {"RESERVED": 2, "FOUND": 2, "OK": 1}


def _parse_line(line: bytes) -> tuple[str, tuple[str, ...]]:
    if _LINE_RE.fullmatch(line) is None:
        raise MalformedReply(f"not a beanstalkd reply line: {line[:80]!r}")
    status, *words = line.decode("ascii").split(" ")
    args = tuple(words)
    want = _BODY_REPLIES.get(status)
    if want is not None and (len(args) != want or not all(a.isdigit() for a in args)):
        raise MalformedReply(f"bad {status} reply line: {line[:80]!r}")
    return status, args


class ReplyParser:
    """Turns the bytes beanstalkd sends into `Reply` values, however the bytes are split.

    A reply is a line `STATUS [word ...]\\r\\n`; RESERVED <id> <n>, FOUND <id> <n> and
    OK <n> are followed by n bytes of body and CRLF. The body may contain anything,
    CRLF included. After `MalformedReply` the parser is spent: every later `feed` raises.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        # A reply line already read whose body is still incomplete: (status, args, size).
        self._head: tuple[str, tuple[str, ...], int] | None = None
        self._error: MalformedReply | None = None

    def feed(self, data: bytes) -> list[Reply]:
        """Take more bytes; return the replies they complete, in order."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except MalformedReply as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes) -> list[Reply]:
        buf = self._buf
        buf += data
        replies: list[Reply] = []
        pos = 0
        while True:
            if self._head is not None:
                status, args, size = self._head
                end = pos + size
                if len(buf) < end + 2:
                    break
                if buf[end : end + 2] != b"\r\n":
                    # beanstalkd always sends the stored body plus 2 bytes that should be
                    # CRLF; a job restored from a damaged binlog can end otherwise. The
                    # stream is still in step, so the reply is kept (its body may fail to
                    # parse) instead of breaking every connection that meets that job.
                    log.warning(
                        "beanstalkd %s body of %d bytes ends with %r, not CRLF (damaged job)",
                        status,
                        size,
                        bytes(buf[end : end + 2]),
                    )
                replies.append(Reply(status, args, bytes(buf[pos:end])))
                pos = end + 2
                self._head = None
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0 or eol - pos > MAX_LINE:
                if len(buf) - pos > MAX_LINE:
                    raise MalformedReply(f"reply line longer than {MAX_LINE} bytes")
                break
            status, args = _parse_line(bytes(buf[pos:eol]))
            pos = eol + 2
            if status in _BODY_REPLIES:
                size = int(args[-1])
                if size > MAX_BODY:
                    raise MalformedReply(f"{status} body of {size} bytes is too large")
                self._head = (status, args, size)
            else:
                replies.append(Reply(status, args))
        del buf[:pos]
        return replies


def _yaml_lines(body: bytes) -> list[str]:
    """The lines of beanstalkd's simple YAML after the `---` header."""
    lines = body.decode("utf-8", "replace").split("\n")
    if lines[0] != "---":
        raise MalformedReply(f"YAML body does not start with '---': {body[:40]!r}")
    return [line for line in lines[1:] if line]


_INT_RE: Final = re.compile(r"-?[0-9]+")
_FLOAT_RE: Final = re.compile(r"-?[0-9]+\.[0-9]+")
#: Keys whose values stay strings even if they look like numbers.
SERVER_TEXT_KEYS: Final = frozenset({"id", "hostname", "os", "platform", "version", "draining"})
TUBE_TEXT_KEYS: Final = frozenset({"name"})
JOB_TEXT_KEYS: Final = frozenset({"tube", "state"})


def parse_stats(
    body: bytes, text_keys: frozenset[str] = frozenset()
) -> dict[str, str | int | float]:
    """Parse a stats body (`key: value` lines): integers become int, decimals float, quoted
    values lose their quotes; keys in `text_keys` always stay strings."""
    stats: dict[str, str | int | float] = {}
    for line in _yaml_lines(body):
        key, sep, value = line.partition(":")
        if not sep or not key:
            raise MalformedReply(f"stats line is not 'key: value': {line[:80]!r}")
        value = value.strip(" ")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            stats[key] = value[1:-1]
        elif key in text_keys:
            stats[key] = value
        elif _INT_RE.fullmatch(value):
            stats[key] = int(value)
        elif _FLOAT_RE.fullmatch(value):
            stats[key] = float(value)
        else:
            stats[key] = value
    return stats


def parse_list(body: bytes) -> list[str]:
    """Parse a list body (`- item` lines)."""
    items = []
    for line in _yaml_lines(body):
        if not line.startswith("- "):
            raise MalformedReply(f"list line does not start with '- ': {line[:80]!r}")
        items.append(line[2:])
    return items


# --- decoders: a reply -> the value a method returns -------------------------------------

Decoder = Callable[[Reply], T]


def _number(reply: Reply, expected: str) -> int:
    """The single numeric word of a reply such as `INSERTED 7` or `WATCHING 2`."""
    if len(reply.args) != 1 or not reply.args[0].isdigit():
        raise UnexpectedReply(reply, expected)
    return int(reply.args[0])


def _body(reply: Reply) -> bytes:
    if reply.body is None:  # the parser attaches one to every body reply
        raise UnexpectedReply(reply, f"a body after {reply.status}")
    return reply.body


_PUT_EXPECTED: Final = "a put outcome (" + ", ".join(sorted(PUT_STATUSES)) + ")"


def decode_put(reply: Reply) -> PutResult:
    status, args = reply.status, reply.args
    if status == "INSERTED" and len(args) == 1 and args[0].isdigit():
        return PutResult("INSERTED", int(args[0]))  # the common case, first
    if status in ("INSERTED", "BURIED"):
        return PutResult(cast(PutStatus, status), _number(reply, _PUT_EXPECTED))
    if status in PUT_STATUSES and not args:
        return PutResult(cast(PutStatus, status))
    raise error_for(reply, _PUT_EXPECTED)


def decode_use(tube: str) -> Decoder[None]:
    """USING <tube>, naming the very tube asked for (a cheap check that replies are in step)."""

    def decode(reply: Reply) -> None:
        if reply.status != "USING" or reply.args != (tube,):
            raise error_for(reply, f"USING {tube}")

    return decode


def decode_reserve(reply: Reply) -> ReservedJob | DeadlineSoon | None:
    if reply.status == "RESERVED":
        return ReservedJob(int(reply.args[0]), _body(reply))
    if reply.status == "TIMED_OUT" and not reply.args:
        return None
    if reply.status == "DEADLINE_SOON" and not reply.args:
        return DEADLINE_SOON
    raise error_for(reply, "RESERVED, TIMED_OUT or DEADLINE_SOON")


def decode_peek(id: int) -> Decoder[bytes | None]:
    """FOUND <id> <n> with the id asked for, or NOT_FOUND -> None."""

    def decode(reply: Reply) -> bytes | None:
        if reply.status == "FOUND" and reply.args[0] == str(id):
            return _body(reply)
        if reply.status == "NOT_FOUND" and not reply.args:
            return None
        raise error_for(reply, f"FOUND {id} or NOT_FOUND")

    return decode


def decode_flag(success: str) -> Decoder[bool]:
    """`success` -> True, NOT_FOUND -> False (delete, release, bury, touch, kick-job)."""

    def decode(reply: Reply) -> bool:
        if reply.args:
            raise UnexpectedReply(reply, f"{success} or NOT_FOUND")
        if reply.status == success:
            return True
        if reply.status == "NOT_FOUND":
            return False
        raise error_for(reply, f"{success} or NOT_FOUND")

    return decode


def decode_watching(reply: Reply) -> int:
    if reply.status == "WATCHING":
        return _number(reply, "WATCHING <count>")
    raise error_for(reply, "WATCHING <count>")


def decode_stats(text_keys: frozenset[str]) -> Decoder[dict[str, str | int | float] | None]:
    """OK <n> + YAML -> dict; NOT_FOUND -> None (stats-tube, stats-job)."""

    def decode(reply: Reply) -> dict[str, str | int | float] | None:
        if reply.status == "OK":
            return parse_stats(_body(reply), text_keys)
        if reply.status == "NOT_FOUND" and not reply.args:
            return None
        raise error_for(reply, "OK <size> or NOT_FOUND")

    return decode


def decode_server_stats(reply: Reply) -> dict[str, str | int | float]:
    if reply.status == "OK":
        return parse_stats(_body(reply), SERVER_TEXT_KEYS)
    raise error_for(reply, "OK <size>")


def decode_list(reply: Reply) -> list[str]:
    if reply.status == "OK":
        return parse_list(_body(reply))
    raise error_for(reply, "OK <size>")


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What a runner needs of `stats-job`: priority, time-to-run and how many times the
    job has been reserved (its attempt number)."""

    pri: int
    ttr: int
    reserves: int


_JOB_INFO_RE: Final = re.compile(rb"^(pri|ttr|reserves): ([0-9]+)$", re.MULTILINE)


def decode_job_info(reply: Reply) -> JobInfo | None:
    """OK <n> + stats-job YAML -> JobInfo (only the three numbers, parsed fast); NOT_FOUND
    -> None."""
    if reply.status == "OK":
        found = dict(_JOB_INFO_RE.findall(_body(reply)))
        try:
            return JobInfo(int(found[b"pri"]), int(found[b"ttr"]), int(found[b"reserves"]))
        except KeyError:
            raise UnexpectedReply(reply, "stats-job with pri, ttr and reserves") from None
    if reply.status == "NOT_FOUND" and not reply.args:
        return None
    raise error_for(reply, "OK <size> or NOT_FOUND")
