"""Fuzzing the RPC layer (hypothesis): whatever a client sends, every request line gets
exactly one reply - a result or a JSON error with a stable, documented code - and the
connection goes on; nothing crashes and nothing hangs.

Driven through the real code: `kqs.rpc.server.Connection` (framing, `parse_request`, the
method table of kqs/rpc/methods.py, access levels, reply encoding) on a fake transport,
over a `kqs.service.Service` built on a real `Journal` in a temporary directory and a
feeder that is never connected (jobs wait in its queue). Requests are written as JSON
text by hand, so they can hold what JSON libraries never produce: invalid UTF-8, bad
escapes, duplicate keys, numbers beyond every range, NaN, deep nesting.

The same properties hold on a server with tokens: before `auth` every request gets an
error (never a result: nothing runs), and after `auth` pipelined in the same write the
requests behave as on an open server.

Nesting deeper than orjson encodes (254 levels) has its own tests at the end (an id that
is not a string, number or null is refused; too deep data is invalid_params); the fuzz
keeps below that depth.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kqs.clock import SYSTEM_CLOCK
from kqs.feeder import FeedConnection, Feeder
from kqs.journal import Journal
from kqs.model import IdGenerator
from kqs.rpc.methods import METHODS, Access
from kqs.rpc.server import Connection, Limits, RpcServer
from kqs.service import Service
from tests.support import scaled
from tests.unit.rpc_transport import FakeTransport

#: Every code docs/protocol.md documents, except `internal_error` (a bug) and the codes of
#: situations this harness never creates (journal failure, shutdown, limits of a server).
EXPECTED_CODES = frozenset(
    {
        "parse_error",
        "invalid_request",
        "method_not_found",
        "invalid_params",
        "payload_too_large",
        "unavailable",
        "not_found",
        "unauthorized",
        "forbidden",
    }
)
PROBE = b'{"id":"\\u2603probe","method":"ping"}'
MAX_LINE = 256 * 1024
REPLY_WITHIN = 5.0


# --- the harness -----------------------------------------------------------------------


async def never_connect() -> FeedConnection:
    raise OSError("no beanstalkd in this test")


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    server: RpcServer
    journal: Journal
    ids: list[str]  # ids the fuzz inserted, for requests about real jobs

    def exchange(
        self, lines: list[bytes], within: float = REPLY_WITHIN
    ) -> tuple[list[bytes], FakeTransport]:
        """Send the lines (and a ping probe) on a new connection; return every reply line
        once each request line has one (AssertionError if not `within` seconds)."""
        return self.loop.run_until_complete(self._exchange(lines, within))

    async def _exchange(
        self, lines: list[bytes], within: float
    ) -> tuple[list[bytes], FakeTransport]:
        conn = Connection(self.server)
        transport = FakeTransport()
        conn.connection_made(transport)
        stream = b"".join(line + b"\n" for line in [*lines, PROBE])
        expected = sum(1 for line in [*lines, PROBE] if line.strip())
        for start in range(0, len(stream), 8192):  # exceptions here: a crash
            conn.data_received(stream[start : start + 8192])
        deadline = self.loop.time() + within
        while transport.out.count(b"\n") < expected and not transport.closed:
            assert self.loop.time() < deadline, f"no reply within {within}s: a hang"
            await asyncio.sleep(0.001)
        conn.connection_lost(None)
        return bytes(transport.out).splitlines(), transport


def open_harness(directory: Path, access: Access) -> Harness:
    """A server over a fresh journal in `directory`, with its own event loop."""
    loop = asyncio.new_event_loop()
    journal = Journal.open(directory / "journal")
    feeder = Feeder(journal, never_connect, SYSTEM_CLOCK)
    service = Service(
        journal,
        feeder,
        IdGenerator("fz", SYSTEM_CLOCK),
        SYSTEM_CLOCK,
        max_jobs_per_insert=50,
        max_payload_bytes=8192,
    )
    server = RpcServer(
        service, request_shutdown=lambda: None, limits=Limits(max_line=MAX_LINE), access=access
    )
    return Harness(loop, server, journal, [])


def close_harness(h: Harness) -> None:
    h.loop.run_until_complete(h.journal.close())
    h.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server without tokens: every connection may call every method."""
    h = open_harness(tmp_path_factory.mktemp("fuzz"), Access())
    try:
        yield h
    finally:
        close_harness(h)


USER_TOKEN = "fuzz-user-token-0123"
ADMIN_TOKEN = "fuzz-admin-token-0123"
AUTH_LINE = orjson.dumps({"id": "\u2603auth", "method": "auth", "params": {"token": USER_TOKEN}})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A server with a user and an admin token: a new connection may only call auth."""
    h = open_harness(tmp_path_factory.mktemp("fuzz-guarded"), Access(USER_TOKEN, ADMIN_TOKEN))
    try:
        yield h
    finally:
        close_harness(h)


def check_replies(
    h: Harness, requests: list[bytes], replies: list[bytes], transport: FakeTransport
) -> list[Any]:
    """Every reply is a well-formed reply object with a documented code; the connection
    stays open and the probe is answered (unless a wrong `auth` token closed it, as
    documented); return the replies other than the probe's."""
    out: list[Any] = []
    probe_answered = False
    for raw in replies:
        reply = orjson.loads(raw)  # a reply that is not JSON fails here
        assert isinstance(reply, dict) and "id" in reply, raw
        assert set(reply) in ({"id", "result"}, {"id", "error"}), raw
        if "error" in reply:
            err = reply["error"]
            assert set(err) == {"code", "message"}, raw
            assert err["code"] in EXPECTED_CODES, raw
            assert isinstance(err["message"], str) and err["message"], raw
        if reply["id"] == "\u2603probe":
            assert reply.get("result") == "pong", raw
            probe_answered = True
            continue
        ids = reply.get("result", {}).get("ids") if isinstance(reply.get("result"), dict) else None
        if isinstance(ids, list):
            h.ids.extend(i for i in ids if isinstance(i, str))
        out.append(reply)
    if any(r.get("error", {}).get("code") == "unauthorized" for r in out):
        return out  # a wrong token: the connection is closed after that reply
    assert not transport.closed, "the connection was closed"
    assert probe_answered, "the connection did not go on after the request"
    assert len(out) == sum(1 for r in requests if r.strip()), (requests, replies)
    return out


def check_unauthenticated(
    requests: list[bytes], replies: list[bytes], transport: FakeTransport
) -> None:
    """On a server with a token, before `auth`: every reply is a well-formed error with a
    documented code, never a result (nothing ran). Either every line was answered, the
    probe `unauthorized`, or a wrong `auth` token closed the connection and its reply
    was the last one (nothing after it is answered)."""
    answered = [orjson.loads(raw) for raw in replies]
    for raw, reply in zip(replies, answered, strict=True):
        assert isinstance(reply, dict) and set(reply) == {"id", "error"}, raw
        assert set(reply["error"]) == {"code", "message"}, raw
        assert reply["error"]["code"] in EXPECTED_CODES, raw
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], raw
    if transport.closed:
        assert answered and answered[-1]["error"]["code"] == "unauthorized", replies
        assert "token" in answered[-1]["error"]["message"], replies  # the wrong-token reply
        return
    probe = [r for r in answered if r["id"] == "\u2603probe"]
    assert [r["error"]["code"] for r in probe] == ["unauthorized"], replies
    assert len(answered) == 1 + sum(1 for r in requests if r.strip()), (requests, replies)


# --- JSON text, written by hand ------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    text: bytes


@dataclass(frozen=True)
class Arr:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Obj:
    pairs: tuple[tuple[Any, Any], ...]  # keys may repeat


@dataclass(frozen=True)
class RealId:
    """One of the ids the fuzz has inserted so far (chosen when rendered)."""

    index: int


Node = Raw | Arr | Obj | RealId | str


def render(node: Any, ids: list[str]) -> bytes:
    if isinstance(node, Raw):
        return node.text
    if isinstance(node, str):
        return orjson.dumps(node)
    if isinstance(node, RealId):
        return orjson.dumps(ids[node.index % len(ids)] if ids else "fz-00000000000000001")
    if isinstance(node, Arr):
        return b"[" + b",".join(render(i, ids) for i in node.items) + b"]"
    assert isinstance(node, Obj)
    return b"{" + b",".join(render(k, ids) + b":" + render(v, ids) for k, v in node.pairs) + b"}"


NUMBERS = [
    "0", "-0", "1", "-1", "1.5", "1.0", "-0.0", "1e2", "1e-400",
    "4294967295", "4294967296", "9223372036854775807", "9223372036854775808",
    "18446744073709551615", "18446744073709551616", "-9223372036854775809",
    "123456789012345678901234567890123456789",
]  # fmt: skip
BROKEN = [
    b"NaN", b"Infinity", b"-Infinity", b"1E400", b"-1e400", b"01", b"+1", b".5", b"1.", b"0x10",
    b"1e", b"--1", b"nul", b"", b'"\\ud800"', b'"\\udfff"', b'"\\x41"', b'"\\u00"',
    b'"\xff\xfe"', b'"\xc3"', b'"\xed\xa0\x80"', b'"a\tb"', b'"a\rb"', b"'single'",
    b'"unterminated', b"[1,]", b"{,}", b'{"a"}', b"[1 2]",
]  # fmt: skip

valid_leaves: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([Raw(n.encode()) for n in NUMBERS]),
    st.integers(-(2**70), 2**70).map(lambda i: Raw(str(i).encode())),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Raw(orjson.dumps(f))),
    st.sampled_from([Raw(b"true"), Raw(b"false"), Raw(b"null"), Raw(b'"\\u0000"')]),
    st.text(max_size=20),
    st.integers(0, 200).map(lambda d: Raw(b"[" * d + b"]" * d)),  # deep, but encodable
    st.integers(0, 10_000).map(RealId),
)
broken_leaves: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([Raw(b) for b in BROKEN]),
    st.integers(1030, 3000).map(lambda d: Raw(b"[" * d + b"]" * d)),  # past the parser's depth
)
keys: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            *("id", "ids", "type", "data", "prio", "delay", "ttr", "outcome", "error"),
            *("attempts", "limit", "after", "all", "token", "method", "params", "", "\u2603"),
        ]
    ),
    st.text(max_size=8),
)
broken_keys = st.sampled_from([Raw(b) for b in BROKEN[14:18]])


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: Arr(tuple(xs))),
        st.lists(st.tuples(keys, children), max_size=4).map(lambda ps: Obj(tuple(ps))),
    )


TYPE_NAMES = ["t", "mail", "a-b", "x" * 200, "x" * 201, "-x", "", "t t", "é", "(ok)$;/+._"]
METHOD_FIELDS = {
    "insert": ["type", "data", "prio", "delay", "ttr"],
    "finish": ["id", "outcome", "type", "error", "attempts"],
    "dead": ["type", "limit", "after"],
    "retry": ["id", "ids", "type"],
    "purge": ["id", "ids", "type", "all"],
    "auth": ["token"],
}
real_ids = st.integers(0, 10_000).map(RealId)
small_ints = st.integers(-2, 100).map(lambda i: Raw(str(i).encode()))


class Values:
    """Strategies for JSON values; `clean` ones are always JSON, the others are not JSON
    about one time in eight."""

    def __init__(self, clean: bool) -> None:
        self.leaves = valid_leaves if clean else st.one_of(*[valid_leaves] * 7, broken_leaves)
        self.keys = keys if clean else st.one_of(*[keys] * 7, broken_keys)
        self.json = st.recursive(self.leaves, containers, max_leaves=12)
        j, leaf = self.json, self.leaves
        self.fields: dict[str, st.SearchStrategy[Any]] = {
            "type": st.sampled_from(TYPE_NAMES) | st.sampled_from(TYPE_NAMES[:3]) | j,
            "prio": st.sampled_from(["urgent", "high", "normal", "bulk", "NORMAL"]) | leaf,
            "delay": small_ints | leaf,
            "ttr": small_ints | leaf,
            "data": j | st.integers(0, 9000).map(lambda n: "x" * n),
            "id": real_ids | real_ids | j,
            "ids": st.lists(real_ids, max_size=3).map(lambda x: Arr(tuple(x))) | j,
            "outcome": st.sampled_from(["done", "dead", "dead", "DONE", ""]) | leaf,
            "error": st.text(max_size=20) | leaf,
            "attempts": small_ints | leaf,
            "limit": small_ints | leaf,
            "after": real_ids | leaf,
            "all": st.sampled_from([Raw(b"true"), Raw(b"false"), Raw(b"1")]),
            "token": st.text(max_size=20) | leaf,
        }


CLEAN, DIRTY = Values(clean=True), Values(clean=False)


@st.composite
def shaped_object(draw: st.DrawFn, fields: list[str], v: Values) -> Obj:
    """An object with some of the method's fields (odd values), sometimes an unknown one,
    sometimes a key twice."""
    chosen = draw(st.lists(st.sampled_from(fields), max_size=len(fields) + 1)) if fields else []
    pairs = [(f, draw(v.fields[f])) for f in chosen]
    if not draw(st.integers(0, 3)):
        pairs.append((draw(v.keys), draw(v.json)))
    return Obj(tuple(pairs))


@st.composite
def params_for(draw: st.DrawFn, method: str, v: Values) -> Any:
    fields = METHOD_FIELDS.get(method, [])
    shape = draw(st.sampled_from(["object", "object", "array", "anything"]))
    if shape == "object":
        return draw(shaped_object(fields, v))
    if shape == "array":
        return Arr(tuple(draw(st.lists(shaped_object(fields, v), max_size=4))))
    return draw(v.json)


short_ids = valid_leaves.filter(lambda v: not isinstance(v, Raw) or len(v.text) < 100)


@st.composite
def requests(draw: st.DrawFn) -> Obj:
    v = CLEAN if draw(st.booleans()) else DIRTY
    method = draw(st.sampled_from(sorted(METHODS)) | st.sampled_from(["nope", "INSERT", ""]))
    pairs: list[tuple[Any, Any]] = []
    if draw(st.integers(0, 9)):
        pairs.append(("id", draw(short_ids)))
    pairs.append(("method", method if draw(st.integers(0, 19)) else draw(v.json)))
    if draw(st.integers(0, 9)):
        pairs.append(("params", draw(params_for(method, v))))
    if not draw(st.integers(0, 14)):
        pairs.append((draw(v.keys), draw(v.json)))  # an unknown top-level field, or a repeat
    return Obj(tuple(draw(st.permutations(pairs))))


# --- the properties ----------------------------------------------------------------------

FUZZ = settings(
    max_examples=scaled(300, 5000),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.lists(requests(), min_size=1, max_size=3))
def test_any_request_gets_one_wellformed_reply_and_the_connection_goes_on(
    harness: Harness, reqs: list[Obj]
) -> None:
    lines = [render(r, harness.ids) for r in reqs]
    replies, transport = harness.exchange(lines)
    got = check_replies(harness, lines, replies, transport)
    if len(lines) == 1:  # a parsed request's reply carries its id
        try:
            sent = orjson.loads(lines[0])
        except orjson.JSONDecodeError:
            sent = None
        if isinstance(sent, dict):
            sent_id = sent.get("id")
            valid_id = sent_id is None or (
                isinstance(sent_id, str | int | float) and not isinstance(sent_id, bool)
            )  # any other id is refused, and the reply has id null
            assert got[0]["id"] == (sent_id if valid_id else None), (lines[0], got[0])


@FUZZ
@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=4))
def test_any_bytes_get_errors_never_a_crash(harness: Harness, lines: list[bytes]) -> None:
    replies, transport = harness.exchange(lines)
    check_replies(harness, lines, replies, transport)


@FUZZ
@given(st.lists(requests(), min_size=1, max_size=3))
def test_before_auth_any_request_gets_an_error_and_nothing_runs(
    guarded: Harness, reqs: list[Obj]
) -> None:
    lines = [render(r, guarded.ids) for r in reqs]
    replies, transport = guarded.exchange(lines)
    check_unauthenticated(lines, replies, transport)
    assert not guarded.journal.jobs  # no insert got through


@FUZZ
@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=4))
def test_before_auth_any_bytes_get_errors_never_a_crash(
    guarded: Harness, lines: list[bytes]
) -> None:
    replies, transport = guarded.exchange(lines)
    check_unauthenticated(lines, replies, transport)


@FUZZ
@given(st.lists(requests(), min_size=1, max_size=3))
def test_after_auth_with_the_user_token_requests_behave_as_on_an_open_server(
    guarded: Harness, reqs: list[Obj]
) -> None:
    """Pipelined after `auth`: each request gets its one well-formed reply (admin methods
    `forbidden`), and the connection goes on unless a later wrong token closed it."""
    lines = [AUTH_LINE, *(render(r, guarded.ids) for r in reqs)]
    replies, transport = guarded.exchange(lines)
    got = check_replies(guarded, lines, replies, transport)
    assert got[0] == {"id": "\u2603auth", "result": {"admin": False}}, got


@settings(max_examples=scaled(60, 600), deadline=None, database=None)
@given(st.data())
def test_every_method_with_wrong_param_types(harness: Harness, data: st.DataObject) -> None:
    """Each method, each of its fields set to a value of every JSON type in turn."""
    method = data.draw(st.sampled_from(sorted(METHOD_FIELDS)))
    wrong = [Raw(b"null"), Raw(b"true"), Raw(b"-1"), Raw(b"1.5"), "s", Arr(()), Obj(())]
    lines = []
    for field, value in itertools.product(METHOD_FIELDS[method], wrong):
        base = [(f, data.draw(CLEAN.fields[f])) for f in METHOD_FIELDS[method] if f != field]
        params = Obj((*base, (field, value)))
        lines.append(
            render(Obj((("id", "w"), ("method", method), ("params", params))), harness.ids)
        )
    replies, transport = harness.exchange(lines)
    check_replies(harness, lines, replies, transport)


# --- regressions: nesting orjson cannot encode (254 levels), odd ids in finish arrays ------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("method", ["ping", "nope", "insert"])
def test_a_deeply_nested_request_id_gets_an_error_reply(harness: Harness, method: str) -> None:
    line = b'{"id":' + nested(300) + b',"method":"' + method.encode() + b'","params":{}}'
    replies, transport = harness.exchange([line], within=1.0)
    (reply,) = check_replies(harness, [line], replies, transport)
    assert reply["error"]["code"] == "invalid_request"


def test_insert_with_too_deeply_nested_data_is_invalid_params(harness: Harness) -> None:
    line = b'{"id":1,"method":"insert","params":{"type":"t","data":' + nested(300) + b"}}"
    replies, transport = harness.exchange([line])
    (reply,) = check_replies(harness, [line], replies, transport)
    assert reply["error"]["code"] == "invalid_params"


def test_echo_of_too_deeply_nested_params_is_not_an_internal_error(harness: Harness) -> None:
    line = b'{"id":1,"method":"echo","params":' + nested(300) + b"}"
    replies, transport = harness.exchange([line])
    check_replies(harness, [line], replies, transport)


def test_finish_array_with_an_unhashable_id_gets_an_error_per_item(harness: Harness) -> None:
    items = (
        b'[{"id":"fz-1","outcome":"done"},{"id":[],"outcome":"done"},{"id":{},"outcome":"done"}]'
    )
    line = b'{"id":1,"method":"finish","params":' + items + b"}"
    replies, transport = harness.exchange([line])
    (reply,) = check_replies(harness, [line], replies, transport)
    codes = [r["error"]["code"] for r in reply["result"]["results"]]
    assert codes == ["not_found", "invalid_params", "invalid_params"]


def test_the_harness_sees_real_inserts(harness: Harness) -> None:
    line = b'{"id":1,"method":"insert","params":[{"type":"t"},{"type":"u","data":[1]}]}'
    replies, transport = harness.exchange([line])
    (reply,) = check_replies(harness, [line], replies, transport)
    assert len(reply["result"]["ids"]) == 2
    assert all(i in harness.journal.jobs for i in reply["result"]["ids"])
