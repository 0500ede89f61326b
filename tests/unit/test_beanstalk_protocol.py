"""The sans-IO half of kqs.beanstalk, and the connection's FIFO over a fake transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kqs.beanstalk.client import BeanstalkClient, _Connection
from kqs.beanstalk.protocol import (
    DEADLINE_SOON,
    ERRORS,
    BadFormatError,
    BeanstalkError,
    BeanstalkUnavailable,
    BuriedError,
    InternalServerError,
    JobTooBigError,
    MalformedReply,
    NotFoundError,
    NotIgnoredError,
    OutOfMemoryError,
    PutItem,
    PutResult,
    Reply,
    ReplyParser,
    ReservedJob,
    UnexpectedReply,
    UnknownCommandError,
    cmd_bury,
    cmd_ignore,
    cmd_job,
    cmd_put,
    cmd_release,
    cmd_reserve,
    cmd_stats_tube,
    cmd_use,
    cmd_watch,
    decode_flag,
    decode_list,
    decode_peek,
    decode_put,
    decode_reserve,
    decode_server_stats,
    decode_stats,
    decode_use,
    decode_watching,
    error_for,
    parse_list,
    parse_stats,
)

# --- parser ------------------------------------------------------------------------------

STREAM = (
    b"USING jobs.mail\r\n"
    b"INSERTED 17\r\n"
    b"RESERVED 17 12\r\nline1\r\nline2\r\n"
    b"FOUND 5 4\r\n\r\n\r\n\r\n"
    b"FOUND 6 0\r\n\r\n"
    b"NOT_FOUND\r\n"
    b"OK 21\r\n---\n- default\n- mail\n\r\n"
    b"WATCHING 2\r\n"
    b"TIMED_OUT\r\n"
)
EXPECTED = [
    Reply("USING", ("jobs.mail",)),
    Reply("INSERTED", ("17",)),
    Reply("RESERVED", ("17", "12"), b"line1\r\nline2"),
    Reply("FOUND", ("5", "4"), b"\r\n\r\n"),
    Reply("FOUND", ("6", "0"), b""),
    Reply("NOT_FOUND", ()),
    Reply("OK", ("21",), b"---\n- default\n- mail\n"),
    Reply("WATCHING", ("2",)),
    Reply("TIMED_OUT", ()),
]


def test_whole_stream_parses_in_order() -> None:
    assert ReplyParser().feed(STREAM) == EXPECTED


def test_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        parser = ReplyParser()
        replies = parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:])
        assert replies == EXPECTED, cut


def test_split_at_every_pair_of_boundaries() -> None:
    for a in range(0, len(STREAM) + 1, 3):
        for b in range(a, len(STREAM) + 1, 5):
            parser = ReplyParser()
            replies = parser.feed(STREAM[:a]) + parser.feed(STREAM[a:b]) + parser.feed(STREAM[b:])
            assert replies == EXPECTED, (a, b)


def test_one_byte_at_a_time() -> None:
    parser = ReplyParser()
    replies: list[Reply] = []
    for i in range(len(STREAM)):
        replies += parser.feed(STREAM[i : i + 1])
    assert replies == EXPECTED


def test_incomplete_reply_waits_for_more() -> None:
    parser = ReplyParser()
    assert parser.feed(b"RESERVED 1 5\r\nab") == []
    assert parser.feed(b"cde") == []
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\n") == [Reply("RESERVED", ("1", "5"), b"abcde")]


def test_body_with_every_byte_value() -> None:
    body = bytes(range(256)) * 3
    data = b"FOUND 9 %d\r\n%b\r\nINSERTED 1\r\n" % (len(body), body)
    assert ReplyParser().feed(data) == [
        Reply("FOUND", ("9", str(len(body))), body),
        Reply("INSERTED", ("1",)),
    ]


def test_a_damaged_body_ending_keeps_the_stream_in_step() -> None:
    """A job restored from a damaged binlog: beanstalkd still sends body + 2 bytes."""
    parser = ReplyParser()
    replies = parser.feed(b"RESERVED 7 3\r\nabcXYTIMED_OUT\r\n")
    assert replies == [Reply("RESERVED", ("7", "3"), b"abc"), Reply("TIMED_OUT")]


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n",  # empty line
        b"inserted 1\r\n",  # lower case status
        b"INSERTED  1\r\n",  # double space
        b"INSERTED 1 \r\n",  # trailing space
        b"INSERTED \x001\r\n",  # control byte
        b"USING caf\xc3\xa9\r\n",  # not ASCII
        b"RESERVED 1\r\n",  # size missing
        b"RESERVED 1 x\r\n",  # size not a number
        b"RESERVED -1 3\r\nabc\r\n",  # id not a number
        b"FOUND 1 99999999999\r\n",  # body too large
        b"X" * 2000,  # endless line
    ],
)
def test_malformed_replies(data: bytes) -> None:
    parser = ReplyParser()
    with pytest.raises(MalformedReply):
        parser.feed(data)
    with pytest.raises(MalformedReply):  # the parser stays spent
        parser.feed(b"INSERTED 1\r\n")


# --- YAML bodies -------------------------------------------------------------------------

SERVER_STATS = (
    b"---\ncurrent-jobs-urgent: 1\ncmd-put: 1000\nmax-job-size: 65535\npid: 3291\n"
    b'version: "1.12"\nrusage-utime: 0.001939\nrusage-stime: 0.000000\ndraining: false\n'
    b"id: 1234567890123456\nhostname: vm\nos: #1 SMP PREEMPT_DYNAMIC @0\nplatform: x86_64\n"
)


def test_server_stats() -> None:
    stats = decode_server_stats(Reply("OK", (str(len(SERVER_STATS)),), SERVER_STATS))
    assert stats == {
        "current-jobs-urgent": 1,
        "cmd-put": 1000,
        "max-job-size": 65535,
        "pid": 3291,
        "version": "1.12",
        "rusage-utime": 0.001939,
        "rusage-stime": 0.0,
        "draining": "false",
        "id": "1234567890123456",  # the server id is text, even when all digits
        "hostname": "vm",
        "os": "#1 SMP PREEMPT_DYNAMIC @0",
        "platform": "x86_64",
    }


def test_tube_and_job_stats_keep_names_as_text() -> None:
    tube = decode_stats(frozenset({"name"}))(Reply("OK", ("1",), b"---\nname: 123\npause: 0\n"))
    assert tube == {"name": "123", "pause": 0}
    job = b"---\nid: 7\ntube: 42\nstate: ready\npri: 9000\ntime-left: 0\n"
    assert decode_stats(frozenset({"tube", "state"}))(Reply("OK", ("1",), job)) == {
        "id": 7,
        "tube": "42",
        "state": "ready",
        "pri": 9000,
        "time-left": 0,
    }
    assert decode_stats(frozenset())(Reply("NOT_FOUND")) is None


def test_empty_value_and_list() -> None:
    assert parse_stats(b"---\nhostname: \nx: -3\n") == {"hostname": "", "x": -3}
    assert parse_list(b"---\n- default\n- a-b\n") == ["default", "a-b"]
    assert parse_list(b"---\n") == []
    assert decode_list(Reply("OK", ("14",), b"---\n- default\n")) == ["default"]


@pytest.mark.parametrize("body", [b"", b"key: 1\n", b"---\nno colon here\n", b"---\n: 1\n"])
def test_malformed_stats(body: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_stats(body)


def test_malformed_list() -> None:
    with pytest.raises(MalformedReply):
        parse_list(b"---\ndefault\n")


# --- the error table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        ("BAD_FORMAT", BadFormatError),
        ("UNKNOWN_COMMAND", UnknownCommandError),
        ("INTERNAL_ERROR", InternalServerError),
        ("OUT_OF_MEMORY", OutOfMemoryError),
        ("NOT_IGNORED", NotIgnoredError),
        ("NOT_FOUND", NotFoundError),
        ("JOB_TOO_BIG", JobTooBigError),
        ("BURIED", BuriedError),
    ],
)
def test_error_table(status: str, cls: type[BeanstalkError]) -> None:
    assert ERRORS[status] is cls
    err = error_for(Reply(status), "WATCHING <count>")
    assert type(err) is cls
    assert err.status == status
    assert status in str(err)


def test_every_table_entry_is_consistent() -> None:
    for status, cls in ERRORS.items():
        assert cls.status == status
        assert issubclass(cls, BeanstalkError)


def test_unknown_status_is_unexpected() -> None:
    err = error_for(Reply("WHATEVER", ("1",)), "DELETED or NOT_FOUND")
    assert isinstance(err, UnexpectedReply)
    assert err.status == "WHATEVER"
    assert "WHATEVER 1" in str(err)
    assert "DELETED or NOT_FOUND" in str(err)


def test_decoders_raise_table_errors() -> None:
    with pytest.raises(NotIgnoredError):
        decode_watching(Reply("NOT_IGNORED"))
    with pytest.raises(InternalServerError):
        decode_flag("DELETED")(Reply("INTERNAL_ERROR"))
    with pytest.raises(OutOfMemoryError):
        decode_server_stats(Reply("OUT_OF_MEMORY"))
    with pytest.raises(BuriedError):  # release -> BURIED
        decode_flag("RELEASED")(Reply("BURIED"))
    with pytest.raises(UnexpectedReply):  # a reply of another command
        decode_flag("DELETED")(Reply("INSERTED", ("3",)))
    with pytest.raises(UnexpectedReply):  # use answered with another tube
        decode_use("a")(Reply("USING", ("b",)))
    with pytest.raises(UnexpectedReply):  # peek answered with another job
        decode_peek(5)(Reply("FOUND", ("6", "1"), b"x"))
    with pytest.raises(UnexpectedReply):
        decode_reserve(Reply("DELETED"))
    with pytest.raises(UnexpectedReply):
        decode_watching(Reply("WATCHING", ("x",)))


def test_outcome_decoders() -> None:
    assert decode_use("a")(Reply("USING", ("a",))) is None
    assert decode_reserve(Reply("RESERVED", ("3", "2"), b"hi")) == ReservedJob(3, b"hi")
    assert decode_reserve(Reply("TIMED_OUT")) is None
    assert decode_reserve(Reply("DEADLINE_SOON")) is DEADLINE_SOON
    assert decode_peek(5)(Reply("FOUND", ("5", "1"), b"x")) == b"x"
    assert decode_peek(5)(Reply("NOT_FOUND")) is None
    for verb in ("DELETED", "RELEASED", "BURIED", "TOUCHED", "KICKED"):
        assert decode_flag(verb)(Reply(verb)) is True
        assert decode_flag(verb)(Reply("NOT_FOUND")) is False
    assert decode_watching(Reply("WATCHING", ("3",))) == 3


# --- put results -------------------------------------------------------------------------


def test_put_results() -> None:
    assert decode_put(Reply("INSERTED", ("42",))) == PutResult("INSERTED", 42)
    assert decode_put(Reply("INSERTED", ("42",))).inserted
    assert decode_put(Reply("BURIED", ("43",))) == PutResult("BURIED", 43)
    assert not decode_put(Reply("BURIED", ("43",))).inserted
    for status in ("JOB_TOO_BIG", "DRAINING", "OUT_OF_MEMORY", "EXPECTED_CRLF"):
        result = decode_put(Reply(status))
        assert result == PutResult(status)
        assert result.id is None


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply("INSERTED"), UnexpectedReply),
        (Reply("INSERTED", ("x",)), UnexpectedReply),
        (Reply("DELETED"), UnexpectedReply),
        (Reply("BAD_FORMAT"), BadFormatError),
        (Reply("UNKNOWN_COMMAND"), UnknownCommandError),
        (Reply("INTERNAL_ERROR"), InternalServerError),
    ],
)
def test_put_errors(reply: Reply, error: type[BeanstalkError]) -> None:
    with pytest.raises(error):
        decode_put(reply)


# --- command encoding --------------------------------------------------------------------


def test_command_bytes() -> None:
    assert cmd_put(b"hello", prio=10, delay=0, ttr=30) == b"put 10 0 30 5\r\nhello\r\n"
    assert cmd_put(b"a\r\nb", prio=0, delay=5, ttr=1) == b"put 0 5 1 4\r\na\r\nb\r\n"
    assert cmd_put(b"", prio=2**32 - 1, delay=0, ttr=1) == b"put 4294967295 0 1 0\r\n\r\n"
    assert cmd_use("jobs.mail") == b"use jobs.mail\r\n"
    assert cmd_watch("a+b") == b"watch a+b\r\n"
    assert cmd_ignore("default") == b"ignore default\r\n"
    assert cmd_stats_tube("x") == b"stats-tube x\r\n"
    assert cmd_reserve(0) == b"reserve-with-timeout 0\r\n"
    assert cmd_job("peek", 7) == b"peek 7\r\n"
    assert cmd_job("delete", 7) == b"delete 7\r\n"
    assert cmd_job("touch", 7) == b"touch 7\r\n"
    assert cmd_job("kick-job", 7) == b"kick-job 7\r\n"
    assert cmd_job("stats-job", 2**64 - 1) == b"stats-job 18446744073709551615\r\n"
    assert cmd_release(7, prio=1, delay=2) == b"release 7 1 2\r\n"
    assert cmd_bury(7, prio=3) == b"bury 7 3\r\n"


@pytest.mark.parametrize("tube", ["", "-x", "a b", "a\r\nput", "é", "x" * 201, "a\tb", "a:b"])
def test_bad_tube_names_are_refused(tube: str) -> None:
    with pytest.raises(ValueError, match="tube name"):
        cmd_use(tube)


def test_longest_tube_name() -> None:
    assert cmd_use("x" * 200) == b"use " + b"x" * 200 + b"\r\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prio": -1, "delay": 0, "ttr": 1},
        {"prio": 2**32, "delay": 0, "ttr": 1},
        {"prio": 1, "delay": -1, "ttr": 1},
        {"prio": 1, "delay": 0, "ttr": 2**32},
        {"prio": True, "delay": 0, "ttr": 1},
        {"prio": 1.5, "delay": 0, "ttr": 1},
    ],
)
def test_bad_put_numbers_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        cmd_put(b"x", **kwargs)


def test_body_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        cmd_put("text", prio=1, delay=0, ttr=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="job id"):
        cmd_job("delete", -1)
    with pytest.raises(ValueError, match="job id"):
        cmd_job("delete", 2**64)


# --- the connection's FIFO, over a fake transport ----------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _connection() -> tuple[_Connection, FakeTransport]:
    conn = _Connection("test:1", asyncio.get_running_loop())
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def send_each(
    conn: Any, commands: list[bytes], decode: Any, timeout: float
) -> list[asyncio.Future[Any]]:
    """Write each command as its own call (one future each)."""
    return [conn.send(c, [decode], timeout, many=False) for c in commands]


def test_a_group_of_commands_shares_one_future_and_stays_in_step() -> None:
    async def main() -> None:
        conn, transport = _connection()
        group = conn.send(
            b"watch a\r\nignore b\r\nwatch c\r\n", [decode_watching] * 3, 10, many=True
        )
        after = conn.send(b"stats\r\n", [decode_server_stats], 10, many=False)
        conn.data_received(b"WATCHING 2\r\nNOT_IGNORED\r\n")
        assert not group.done()
        conn.data_received(b"WATCHING 3\r\nOK 11\r\n---\npid: 1\n\r\n")
        with pytest.raises(NotIgnoredError):
            group.result()  # the first error, once the whole group was answered
        assert after.result()["pid"] == 1  # and the reply after it went to its own call
        assert not transport.aborted

    asyncio.run(main())


def test_replies_resolve_futures_in_order() -> None:
    async def main() -> None:
        conn, transport = _connection()
        f1, f2 = send_each(conn, [b"delete 1\r\n", b"delete 2\r\n"], decode_flag("DELETED"), 10)
        f3 = conn.send(b"peek 3\r\n", [decode_peek(3)], 10, many=False)
        assert transport.written == b"delete 1\r\ndelete 2\r\npeek 3\r\n"
        conn.data_received(b"DELETED\r\nNOT_FO")
        assert f1.result() is True
        assert not f2.done()
        conn.data_received(b"UND\r\nFOUND 3 1\r\nx\r\n")
        assert f2.result() is False
        assert f3.result() == b"x"
        assert not transport.aborted

    asyncio.run(main())


def test_error_status_fails_only_its_call() -> None:
    async def main() -> None:
        conn, transport = _connection()
        f1, f2 = send_each(conn, [b"ignore a\r\n", b"watch b\r\n"], decode_watching, 10)
        conn.data_received(b"NOT_IGNORED\r\nWATCHING 2\r\n")
        with pytest.raises(NotIgnoredError):
            f1.result()
        assert f2.result() == 2
        assert not transport.aborted

    asyncio.run(main())


@pytest.mark.parametrize(
    ("reply", "first_error"),
    [
        (b"UNKNOWN_COMMAND\r\n", UnknownCommandError),  # the server misread the stream
        (b"BAD_FORMAT\r\n", BadFormatError),
        (b"INSERTED 1\r\n", UnexpectedReply),  # not an answer to delete
        (b"bogus\r\n", BeanstalkUnavailable),  # not a reply at all
    ],
)
def test_out_of_step_breaks_the_connection(reply: bytes, first_error: type[Exception]) -> None:
    async def main() -> None:
        conn, transport = _connection()
        f1, f2 = send_each(conn, [b"delete 1\r\n", b"delete 2\r\n"], decode_flag("DELETED"), 10)
        conn.data_received(reply)
        with pytest.raises(first_error):
            f1.result()
        with pytest.raises(BeanstalkUnavailable):
            f2.result()
        assert transport.aborted
        with pytest.raises(BeanstalkUnavailable):
            conn.send(b"stats\r\n", [decode_server_stats], 10, many=False)

    asyncio.run(main())


def test_unsolicited_reply_breaks_the_connection() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(b"INSERTED 1\r\n")
        assert transport.aborted
        with pytest.raises(BeanstalkUnavailable) as info:
            conn.send(b"stats\r\n", [decode_server_stats], 10, many=False)
        assert isinstance(info.value.__cause__, MalformedReply)

    asyncio.run(main())


def test_deadline_fails_every_pending_call() -> None:
    async def main() -> None:
        conn, transport = _connection()
        f1, f2 = send_each(conn, [b"delete 1\r\n", b"delete 2\r\n"], decode_flag("DELETED"), 0.05)
        for future in (f1, f2):
            with pytest.raises(BeanstalkUnavailable) as info:
                await future
            assert isinstance(info.value.__cause__, TimeoutError)
        assert transport.aborted

    asyncio.run(main())


def test_later_deadline_waits_for_earlier_commands() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        conn, _ = _connection()
        slow = conn.send(b"reserve-with-timeout 1\r\n", [decode_reserve], 5, many=False)
        fast = conn.send(b"stats\r\n", [decode_server_stats], 0.01, many=False)
        # `fast` cannot be answered before `slow`, so it inherits the later deadline.
        await asyncio.sleep(0.05)
        assert not fast.done()
        conn.data_received(b"TIMED_OUT\r\nOK 4\r\n---\n\r\n")
        assert slow.result() is None
        assert fast.result() == {}
        # An idle connection with a stale timer still honours a new, shorter deadline.
        start = loop.time()
        quick = conn.send(b"stats\r\n", [decode_server_stats], 0.05, many=False)
        with pytest.raises(BeanstalkUnavailable):
            await quick
        assert loop.time() - start < 1.0

    asyncio.run(main())


def test_cancelled_caller_keeps_the_fifo_in_step() -> None:
    async def main() -> None:
        conn, _ = _connection()
        f1, f2 = send_each(conn, [b"delete 1\r\n", b"delete 2\r\n"], decode_flag("DELETED"), 10)
        f1.cancel()
        conn.data_received(b"DELETED\r\nNOT_FOUND\r\n")
        assert f2.result() is False

    asyncio.run(main())


def test_eof_fails_pending_calls() -> None:
    async def main() -> None:
        conn, _ = _connection()
        future = conn.send(b"stats\r\n", [decode_server_stats], 10, many=False)
        conn.eof_received()
        with pytest.raises(BeanstalkUnavailable, match="closed the connection"):
            future.result()

    asyncio.run(main())


def test_a_broken_put_batch_says_which_puts_were_answered() -> None:
    async def main() -> None:
        conn, transport = _connection()
        client = BeanstalkClient(conn)
        items = [PutItem("t", b"job%d" % i, 0, 0, 30) for i in range(4)]
        batch = asyncio.ensure_future(client.put_batch(items))
        await asyncio.sleep(0)
        assert transport.written.startswith(b"use t\r\nput 0 0 30 4\r\njob0\r\n")
        conn.data_received(b"USING t\r\nINSERTED 7\r\nBURIED 8\r\n")
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(BeanstalkUnavailable) as caught:
            await batch
        assert caught.value.partial == [PutResult("INSERTED", 7), PutResult("BURIED", 8)]

    asyncio.run(main())
