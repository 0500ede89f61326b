from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kqs.errors import InvalidRequest, ParseError
from kqs.rpc.protocol import (
    ErrorReply,
    LineSplitter,
    Request,
    encode_error,
    encode_result,
    parse_request,
)


def test_splitter_yields_complete_lines_and_keeps_the_rest() -> None:
    s = LineSplitter(100)
    assert s.feed(b'{"a":1}\n{"b"') == ([b'{"a":1}'], None)
    assert s.feed(b":2}\n\n") == ([b'{"b":2}', b""], None)
    assert s.buffered == 0


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), max_size=8), st.data())
def test_splitter_any_chunking_gives_the_same_lines(
    lines: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    s = LineSplitter(1000)
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out, err = s.feed(stream[prev:cut])
        assert err is None
        got += out
        prev = cut
    assert got == lines


def test_splitter_refuses_a_line_over_the_limit_even_before_its_newline() -> None:
    s = LineSplitter(10)
    lines, err = s.feed(b"ok\n" + b"x" * 11)
    assert lines == [b"ok"]
    assert err is not None and err.code == "line_too_long"


def test_splitter_refuses_a_complete_long_line() -> None:
    lines, err = LineSplitter(10).feed(b"y" * 11 + b"\n")
    assert lines == [] and err is not None


def test_splitter_accepts_a_line_of_exactly_the_limit() -> None:
    assert LineSplitter(10).feed(b"z" * 10 + b"\n") == ([b"z" * 10], None)


def test_parse_request_ok() -> None:
    req = parse_request(b'{"id": "a", "method": "insert", "params": [{"type": "t"}]}\r')
    assert req == Request("a", "insert", [{"type": "t"}])


def test_params_default_to_an_empty_object() -> None:
    assert parse_request(b'{"method":"ping"}') == Request(None, "ping", {})


@pytest.mark.parametrize(
    ("line", "code", "req_id"),
    [
        (b"not json", ParseError.code, None),
        (b"\xff\xfe", ParseError.code, None),
        (b'{"id": 1, "method": "ping"', ParseError.code, None),
        (b"[1,2]", InvalidRequest.code, None),
        (b'"str"', InvalidRequest.code, None),
        (b'{"id": 5}', InvalidRequest.code, 5),
        (b'{"id": 5, "method": 3}', InvalidRequest.code, 5),
        (b'{"id": 5, "method": "ping", "params": 3}', InvalidRequest.code, 5),
        (b'{"id": 5, "method": "ping", "extra": 1}', InvalidRequest.code, 5),
        (b'{"id": 1, "method": "ping", "params": NaN}', ParseError.code, None),
    ],
)
def test_bad_requests_become_error_replies(line: bytes, code: str, req_id: object) -> None:
    reply = parse_request(line)
    assert isinstance(reply, ErrorReply)
    assert reply.error.code == code
    assert reply.id == req_id
    assert reply.error.message


@given(st.binary(max_size=200))
def test_parse_request_never_raises(line: bytes) -> None:
    parse_request(line)


def test_encoding_is_one_line_with_the_id() -> None:
    assert encode_result(3, {"ids": ["x"]}) == b'{"id":3,"result":{"ids":["x"]}}\n'
    err = orjson.loads(encode_error("q", InvalidRequest("bad")))
    assert err == {"id": "q", "error": {"code": "invalid_request", "message": "bad"}}
