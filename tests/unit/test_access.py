"""Access levels: what each token grants, and how a connection applies them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest

from kqs.rpc.methods import Access, Level
from kqs.rpc.server import Connection, RpcServer
from kqs.service import Service
from tests.unit.rpc_transport import FakeTransport


@pytest.mark.parametrize(
    ("access", "initial"),
    [
        (Access(), Level.ADMIN),
        (Access(token="t" * 16), Level.NONE),
        (Access(admin_token="a" * 16), Level.USER),
        (Access(token="t" * 16, admin_token="a" * 16), Level.NONE),
    ],
)
def test_initial_level(access: Access, initial: Level) -> None:
    assert access.initial() == initial


def test_tokens_grant_their_level() -> None:
    both = Access(token="t" * 16, admin_token="a" * 16)
    assert both.level_of("t" * 16) == Level.USER
    assert both.level_of("a" * 16) == Level.ADMIN
    assert both.level_of("x" * 16) == Level.NONE
    assert both.level_of("") == Level.NONE
    assert Access(token="t" * 16).level_of("t" * 16) == Level.ADMIN  # the only token is admin


def test_without_an_auth_token_any_token_keeps_the_level_every_client_has() -> None:
    assert Access().level_of("whatever-the-client-has") == Level.ADMIN
    only_admin = Access(admin_token="a" * 16)
    assert only_admin.level_of("some-user-token-x") == Level.USER
    assert only_admin.level_of("a" * 16) == Level.ADMIN


# --- through a connection: access is checked in arrival order ---------------------------

USER = "u" * 16
ADMIN = "a" * 16


@dataclass
class Session:
    """One connection on an in-memory transport; `shutdowns` counts quit's requests."""

    conn: Connection
    transport: FakeTransport
    shutdowns: list[None] = field(default_factory=list)

    def send(self, *requests: dict[str, Any]) -> None:
        """Write every request in one chunk (pipelined), as a client may."""
        self.conn.data_received(b"".join(orjson.dumps(r) + b"\n" for r in requests))

    async def replies(self, count: int) -> dict[Any, Any]:
        """The first `count` replies, by request id (after letting tasks run)."""
        for _ in range(50):
            if self.transport.out.count(b"\n") >= count:
                break
            await asyncio.sleep(0)
        lines = bytes(self.transport.out).splitlines()
        assert len(lines) == count, lines
        return {r["id"]: r.get("result", r.get("error")) for r in map(orjson.loads, lines)}


def session(access: Access, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> Session:
    shutdowns: list[None] = []
    server = RpcServer(
        cast(Service, None),  # auth, ping, echo and quit never touch it
        request_shutdown=lambda: shutdowns.append(None),
        access=access,
    )
    conn = Connection(server)
    transport = FakeTransport(peer)
    conn.connection_made(transport)
    return Session(conn, transport, shutdowns)


def call(req_id: int, method: str, params: Any = None) -> dict[str, Any]:
    return {"id": req_id, "method": method, "params": {} if params is None else params}


def code(reply: Any) -> str:
    assert isinstance(reply, dict) and "code" in reply, reply
    return str(reply["code"])


def test_auth_pipelined_with_requests_applies_to_the_requests_after_it() -> None:
    async def main() -> None:
        s = session(Access(token=USER))
        s.send(call(1, "ping"), call(2, "auth", {"token": USER}), call(3, "ping"))
        got = await s.replies(3)
        assert code(got[1]) == "unauthorized"  # before auth
        assert got[2] == {"admin": True}
        assert got[3] == "pong"
        assert not s.transport.closed

    asyncio.run(main())


def test_an_admin_check_sees_the_level_of_the_lines_before_it_not_after() -> None:
    async def main() -> None:
        s = session(Access(token=USER, admin_token=ADMIN))
        s.send(
            call(1, "auth", {"token": USER}),
            call(2, "retry", {"type": "mail"}),  # user level here: forbidden
            call(3, "auth", {"token": ADMIN}),
        )
        got = await s.replies(3)
        assert got[1] == {"admin": False}
        assert code(got[2]) == "forbidden"
        assert got[3] == {"admin": True}

    asyncio.run(main())


def test_a_wrong_token_pipelined_closes_and_nothing_after_it_runs() -> None:
    async def main() -> None:
        s = session(Access(token=USER))
        s.send(call(1, "auth", {"token": "x" * 16}), call(2, "quit"), call(3, "ping"))
        got = await s.replies(1)
        assert code(got[1]) == "unauthorized"
        assert s.transport.closed and s.shutdowns == []

    asyncio.run(main())


def test_auth_on_a_server_without_tokens_succeeds_and_keeps_the_connection() -> None:
    async def main() -> None:
        s = session(Access())
        s.send(call(1, "auth", {"token": "client-side-token"}), call(2, "ping"))
        got = await s.replies(2)
        assert got == {1: {"admin": True}, 2: "pong"}
        assert not s.transport.closed

    asyncio.run(main())


def test_with_only_an_admin_token_another_token_leaves_user_access() -> None:
    async def main() -> None:
        s = session(Access(admin_token=ADMIN))
        s.send(call(1, "auth", {"token": "client-side-token"}), call(2, "quit"), call(3, "ping"))
        got = await s.replies(3)
        assert got[1] == {"admin": False}
        assert code(got[2]) == "forbidden"
        assert got[3] == "pong"
        assert not s.transport.closed and s.shutdowns == []

    asyncio.run(main())


def test_quit_needs_the_admin_token() -> None:
    async def main() -> None:
        s = session(Access(token=USER, admin_token=ADMIN))
        s.send(call(1, "auth", {"token": USER}), call(2, "quit"))
        s.send(call(3, "auth", {"token": ADMIN}), call(4, "quit"))
        got = await s.replies(4)
        assert got[1] == {"admin": False}
        assert code(got[2]) == "forbidden" and "admin" in got[2]["message"]
        assert got[3] == {"admin": True}
        assert got[4] == "shutting down"
        assert s.shutdowns == [None]

    asyncio.run(main())


@pytest.mark.parametrize(
    "peer", [("192.0.2.7", 5000), ("::ffff:10.1.2.3", 5000), ("2001:db8::1", 1)]
)
def test_quit_from_a_non_loopback_address_is_forbidden_even_for_an_admin(
    peer: tuple[str, int],
) -> None:
    async def main() -> None:
        s = session(Access(token=USER, admin_token=ADMIN), peer)
        s.send(call(1, "auth", {"token": ADMIN}), call(2, "quit"), call(3, "ping"))
        got = await s.replies(3)
        assert got[1] == {"admin": True}
        assert code(got[2]) == "forbidden" and "loopback" in got[2]["message"]
        assert got[3] == "pong"  # the connection goes on
        assert s.shutdowns == []

    asyncio.run(main())


@pytest.mark.parametrize(
    "peer", [("127.0.0.1", 5000), ("::1", 5000), ("127.8.9.10", 1), ("::ffff:127.0.0.1", 1)]
)
def test_quit_from_loopback_is_accepted(peer: tuple[str, int]) -> None:
    async def main() -> None:
        s = session(Access(), peer)
        s.send(call(1, "quit"))
        assert (await s.replies(1)) == {1: "shutting down"}
        assert s.shutdowns == [None]

    asyncio.run(main())
