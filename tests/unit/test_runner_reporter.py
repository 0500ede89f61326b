"""The reporter: batching, and retrying until acknowledged, against a fake transport."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kqs.backoff import Backoff
from kqs.client import RemoteError
from kqs.clock import ManualClock
from kqs.runner.kqsrpc import KqsUnavailable
from kqs.runner.reporter import FinishItem, Reporter


class FakeServer:
    """Answers `finish` arrays; `down` makes calls fail; `item_errors` answers chosen ids
    with an error code; `call_error` fails the whole call with an error reply."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.finished: list[str] = []
        self.down = False
        self.call_error: str | None = None
        self.item_errors: dict[str, str] = {}
        self.called = asyncio.Event()

    async def calls_reach(self, n: int) -> None:
        """Wait until `n` calls have been made."""
        while len(self.calls) < n:
            self.called.clear()
            await self.called.wait()

    async def send(self, items: list[dict[str, Any]]) -> Any:
        await asyncio.sleep(0)
        self.calls.append(items)
        self.called.set()
        if self.down:
            raise KqsUnavailable("connection refused")
        if self.call_error is not None:
            raise RemoteError(self.call_error, "whole call refused")
        results = []
        for item in items:
            code = self.item_errors.get(item["id"])
            if code is not None:
                results.append({"id": item["id"], "error": {"code": code, "message": code}})
            else:
                self.finished.append(item["id"])
                results.append({"id": item["id"], "outcome": item["outcome"]})
        return {"results": results}


def item(n: int, outcome: str = "done") -> FinishItem:
    if outcome == "dead":
        return FinishItem(f"n1-{n:04x}", "dead", "t", "boom", 3)
    return FinishItem(f"n1-{n:04x}", "done", "t")


def run(test: Callable[[Reporter, FakeServer, ManualClock], Any], **kw: Any) -> None:
    async def main() -> None:
        server = FakeServer()
        clock = ManualClock()
        reporter = Reporter("s", server.send, clock, **kw)
        task = asyncio.create_task(reporter.run())
        try:
            await test(reporter, server, clock)
        finally:
            task.cancel()

    asyncio.run(main())


def test_wire_items() -> None:
    assert item(1).wire() == {"id": "n1-0001", "outcome": "done", "type": "t"}
    assert item(2, "dead").wire() == {
        "id": "n1-0002",
        "outcome": "dead",
        "type": "t",
        "error": "boom",
        "attempts": 3,
    }


def test_reports_added_together_go_in_one_call() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        for n in range(10):
            reporter.add(item(n))
        assert reporter.pending == 10
        assert await reporter.flush(5)
        assert len(server.calls) == 1 and len(server.calls[0]) == 10
        assert server.finished == [item(n).id for n in range(10)]
        assert clock.slept == [0.02]  # one linger
        assert reporter.stats.acked == 10

    run(test)


def test_batches_are_capped_and_full_batches_do_not_linger() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        for n in range(25):
            reporter.add(item(n))
        assert await reporter.flush(5)
        assert [len(c) for c in server.calls] == [10, 10, 5]
        assert clock.slept == [0.02]  # only before the last, partial batch
        assert server.finished == [item(n).id for n in range(25)]

    run(test, max_batch=10)


def test_unreachable_server_keeps_everything_and_retries_with_backoff() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        server.down = True
        for n in range(3):
            reporter.add(item(n))
        await server.calls_reach(4)
        assert reporter.pending == 3
        reporter.add(item(3))
        server.down = False
        assert await reporter.flush(5)
        assert server.finished == [item(n).id for n in range(4)]
        backoffs = [s for s in clock.slept if s != 0.02]
        assert backoffs[:3] == [1.0, 2.0, 4.0]
        assert reporter.stats.failures >= 4

    run(test, backoff=Backoff(base=1.0, cap=60, jitter=0))


def test_whole_call_error_replies_are_retried() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        server.call_error = "shutting_down"
        reporter.add(item(1))
        await server.calls_reach(2)
        assert reporter.pending == 1
        server.call_error = None
        assert await reporter.flush(5)
        assert server.finished == [item(1).id]

    run(test)


def test_item_errors_not_found_is_acked_invalid_is_dropped_others_retried() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        server.item_errors = {
            item(1).id: "not_found",
            item(2).id: "invalid_params",
            item(3).id: "journal_failed",
        }
        for n in range(5):
            reporter.add(item(n))
        await server.calls_reach(2)
        assert server.calls[0] == [item(n).wire() for n in range(5)]
        assert server.calls[1] == [item(3).wire()]  # only the one that can get better
        assert reporter.pending == 1
        del server.item_errors[item(3).id]
        assert await reporter.flush(5)
        assert server.finished == [item(0).id, item(4).id, item(3).id]
        assert reporter.stats.acked == 4 and reporter.stats.dropped == 1

    run(test)


def test_a_result_that_does_not_match_is_a_failed_call() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        answers: list[Any] = [{"results": []}, "nonsense", None]

        async def send(items: list[dict[str, Any]]) -> Any:
            return answers.pop(0) if answers else await server.send(items)

        reporter._send = send
        reporter.add(item(1))
        assert await reporter.flush(5)
        assert answers == []
        assert reporter.stats.failures == 3
        assert server.finished == [item(1).id]

    run(test)


def test_retried_items_keep_their_place_before_newer_ones() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        server.item_errors = {item(0).id: "journal_failed"}
        reporter.add(item(0))
        reporter.add(item(1))
        await server.calls_reach(1)
        reporter.add(item(2))
        del server.item_errors[item(0).id]
        assert await reporter.flush(5)
        assert server.calls[1][0] == item(0).wire()
        assert server.finished == [item(1).id, item(0).id, item(2).id]

    run(test)


def test_flush_gives_up_after_its_timeout() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        server.down = True
        reporter.add(item(1))
        assert not await reporter.flush(0.05)
        assert reporter.pending == 1

    async def main() -> None:
        server = FakeServer()
        # a real clock here: flush's timeout is real time and backoff must not spin
        from kqs.clock import SystemClock

        reporter = Reporter("s", server.send, SystemClock(), backoff=Backoff(base=0.01, cap=0.02))
        task = asyncio.create_task(reporter.run())
        try:
            await test(reporter, server, ManualClock())
        finally:
            task.cancel()

    asyncio.run(main())


def test_batches_shrink_when_the_server_finds_the_line_too_long() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        sizes: list[int] = []

        async def send(items: list[dict[str, Any]]) -> Any:
            sizes.append(len(items))
            if len(items) > 3:
                raise KqsUnavailable("line_too_long: request line too long", "line_too_long")
            return await server.send(items)

        reporter._send = send
        for n in range(10):
            reporter.add(item(n))
        assert await reporter.flush(5)
        assert sizes[:3] == [10, 5, 2]
        assert server.finished == [item(n).id for n in range(10)]

    run(test)


def test_on_settled_runs_when_acknowledged_or_refused_for_good() -> None:
    async def test(reporter: Reporter, server: FakeServer, clock: ManualClock) -> None:
        settled: list[str] = []
        server.item_errors = {"n1-0002": "invalid_params", "n1-0003": "journal_failed"}

        def note(n: int) -> Callable[[], None]:
            return lambda: settled.append(str(n))

        for n in (1, 2, 3, 4):
            reporter.add(FinishItem(f"n1-{n:04x}", "done", "t", on_settled=note(n)))
        await server.calls_reach(1)
        await server.calls_reach(2)
        assert sorted(settled) == ["1", "2", "4"]  # 3 is kept, and settles once it succeeds
        del server.item_errors["n1-0003"]
        assert await reporter.flush(5)
        assert sorted(settled) == ["1", "2", "3", "4"]

    run(test)
