"""A connection stops being read while too many of its requests are in flight, or while
its replies go unread, and is read again once it catches up."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from kqs.rpc.methods import METHODS, Caller, Level
from kqs.rpc.server import Connection, Limits, RpcServer
from kqs.service import Service
from tests.unit.rpc_transport import FakeTransport


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """A method `wait` whose calls finish when the returned event is set."""
    event = asyncio.Event()

    async def wait(service: Service, params: Any, caller: Caller) -> str:
        await event.wait()
        return "done"

    monkeypatch.setitem(METHODS, "wait", (wait, Level.USER))
    return event


def connect(max_inflight: int) -> tuple[Connection, FakeTransport]:
    server = RpcServer(
        cast(Service, None),  # the methods used here never touch it
        request_shutdown=lambda: None,
        limits=Limits(max_inflight=max_inflight),
    )
    conn = Connection(server)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def test_reading_pauses_at_max_inflight_and_resumes_below(gate: asyncio.Event) -> None:
    async def main() -> None:
        conn, transport = connect(max_inflight=2)
        conn.data_received(b'{"id":1,"method":"wait"}\n')
        assert transport.reading
        conn.data_received(b'{"id":2,"method":"wait"}\n')
        assert not transport.reading  # two in flight: the limit
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert transport.reading
        assert transport.out.count(b'"result":"done"') == 2

    asyncio.run(main())


def test_reading_pauses_while_replies_go_unread() -> None:
    async def main() -> None:
        conn, transport = connect(max_inflight=100)
        conn.pause_writing()
        assert not transport.reading
        conn.data_received(b'{"id":1,"method":"ping"}\n')  # already in the buffer
        assert not transport.reading
        conn.resume_writing()
        assert transport.reading

    asyncio.run(main())
