"""kqs.beanstalk.BeanstalkClient against a real beanstalkd."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import greenstalk
import pytest

from kqs.beanstalk.client import BeanstalkClient
from kqs.beanstalk.protocol import (
    DEADLINE_SOON,
    BeanstalkUnavailable,
    NotIgnoredError,
    PutItem,
    PutResult,
    ReservedJob,
    UnknownCommandError,
    decode_server_stats,
)
from tests.support import BeanstalkdProcess, free_port


async def _client(server: BeanstalkdProcess, **kwargs: Any) -> BeanstalkClient:
    return await BeanstalkClient.connect(server.host, server.port, **kwargs)


async def _poll(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        pause = 0.005
        while not await predicate():
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)


TUBES = ("alpha", "beta", "gamma")


def _item(i: int) -> PutItem:
    # Runs of 7 on one tube, so that `use` is needed only at every 7th job.
    return PutItem(
        tube=TUBES[(i // 7) % 3],
        body=b"job %d\r\n\x00" % i,
        prio=1000 + i,
        delay=(i % 4) * 100,
        ttr=10 + i,
    )


def test_put_batch_across_tubes(beanstalkd: BeanstalkdProcess) -> None:
    items = [_item(i) for i in range(1000)]
    uses = sum(
        1 for i, item in enumerate(items) if item.tube != (items[i - 1].tube if i else "default")
    )

    async def main() -> list[PutResult]:
        client = await _client(beanstalkd)
        try:
            results = await client.put_batch(items)
            assert [r.status for r in results] == ["INSERTED"] * 1000
            ids = [r.id for r in results]
            assert len(set(ids)) == 1000
            assert client.using == items[-1].tube
            stats = await client.stats()
            assert stats["cmd-use"] == uses
            assert stats["cmd-put"] == 1000
            # stats-job for every job, pipelined from concurrent callers.
            jobs = await asyncio.gather(*(client.stats_job(r.id or 0) for r in results))
            for item, result, job in zip(items, results, jobs, strict=True):
                assert job is not None
                assert job["id"] == result.id
                assert job["tube"] == item.tube
                assert job["pri"] == item.prio
                assert job["delay"] == item.delay
                assert job["ttr"] == item.ttr
                assert job["state"] == ("delayed" if item.delay else "ready")
            for tube in TUBES:
                tube_stats = await client.stats_tube(tube)
                assert tube_stats is not None
                assert tube_stats["name"] == tube
                assert tube_stats["total-jobs"] == sum(1 for i in items if i.tube == tube)
            assert set(await client.list_tubes()) == {"default", *TUBES}
            assert await client.peek_batch([r.id or 0 for r in results[:50]]) == [
                i.body for i in items[:50]
            ]
            return results
        finally:
            await client.close()

    results = asyncio.run(main())
    # An independent view of a few jobs, through greenstalk.
    gs = greenstalk.Client((beanstalkd.host, beanstalkd.port), encoding=None)
    try:
        for n in (0, 1, 499, 998, 999):
            job_id = results[n].id
            assert job_id is not None
            job = gs.stats_job(job_id)
            assert job["tube"] == items[n].tube
            assert job["pri"] == items[n].prio
            assert job["delay"] == items[n].delay
            assert job["ttr"] == items[n].ttr
            assert gs.peek(job_id).body == items[n].body
    finally:
        gs.close()


def test_concurrent_callers_pipeline_on_one_connection(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            await client.use("many")
            results = await asyncio.gather(
                *(client.put(b"%d" % i, prio=i, delay=0, ttr=5) for i in range(500))
            )
            assert all(r.inserted for r in results)
            bodies = await asyncio.gather(*(client.peek(r.id or 0) for r in results))
            assert bodies == [b"%d" % i for i in range(500)]
            assert await client.put_batch([]) == []
            assert await client.peek_batch([]) == []
        finally:
            await client.close()

    asyncio.run(main())


def test_peek_and_peek_batch(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            a = await client.put(b"a\r\nb", prio=1, delay=0, ttr=5)
            b = await client.put(b"", prio=1, delay=0, ttr=5)
            c = await client.put(bytes(range(256)), prio=1, delay=60, ttr=5)
            assert a.id
            assert b.id
            assert c.id
            assert await client.peek(a.id) == b"a\r\nb"
            assert await client.peek(987654) is None
            assert await client.peek_batch([a.id, 987654, b.id, c.id, 0]) == [
                b"a\r\nb",
                None,
                b"",
                bytes(range(256)),
                None,
            ]
        finally:
            await client.close()

    asyncio.run(main())


def test_worker_commands(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            assert await client.watch("work") == 2
            assert await client.ignore("default") == 1
            with pytest.raises(NotIgnoredError):
                await client.ignore("work")
            await client.use("work")
            put = await client.put(b"payload", prio=5, delay=0, ttr=60)
            assert put.inserted
            assert put.id is not None
            jid = put.id

            job = await client.reserve(1)
            assert job == ReservedJob(jid, b"payload")
            assert await client.touch(jid) is True
            assert await client.release(jid, prio=7, delay=0) is True
            assert (await client.stats_job(jid) or {})["pri"] == 7

            assert await client.reserve(1) == ReservedJob(jid, b"payload")
            assert await client.bury(jid, prio=9) is True
            assert (await client.stats_job(jid) or {})["state"] == "buried"
            assert await client.kick_job(jid) is True
            assert (await client.stats_job(jid) or {})["state"] == "ready"

            assert await client.reserve(1) == ReservedJob(jid, b"payload")
            assert await client.delete(jid) is True

            # Every job command on a missing (or not reserved) job: False / None.
            assert await client.delete(jid) is False
            assert await client.touch(jid) is False
            assert await client.release(jid, prio=1, delay=0) is False
            assert await client.bury(jid, prio=1) is False
            assert await client.kick_job(jid) is False
            assert await client.stats_job(jid) is None
            assert await client.stats_tube("no-such-tube") is None
        finally:
            await client.close()

    asyncio.run(main())


def test_reserve_timeout_and_deadline_soon(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = await _client(beanstalkd)
        try:
            assert await client.reserve(0) is None
            start = loop.time()
            assert await client.reserve(1) is None
            assert 0.5 < loop.time() - start < 5
            # A job reserved with TTR 1 is at once inside beanstalkd's one-second margin.
            put = await client.put(b"short", prio=1, delay=0, ttr=1)
            job = await client.reserve(1)
            assert isinstance(job, ReservedJob)
            assert job.id == put.id
            assert await client.reserve(1) is DEADLINE_SOON
        finally:
            await client.close()

    asyncio.run(main())


def test_job_too_big_is_a_result(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            big = b"x" * 65536  # beanstalkd's default max-job-size is 65535
            assert await client.put(big, prio=1, delay=0, ttr=5) == PutResult("JOB_TOO_BIG")
            results = await client.put_batch(
                [
                    PutItem("t", b"small", 1, 0, 5),
                    PutItem("t", big, 1, 0, 5),
                    PutItem("t", b"x" * 65535, 1, 0, 5),
                ]
            )
            assert [r.status for r in results] == ["INSERTED", "JOB_TOO_BIG", "INSERTED"]
            assert results[1].id is None
            # The server skipped the refused body: the connection is still in step.
            assert await client.peek(results[2].id or 0) == b"x" * 65535
        finally:
            await client.close()

    asyncio.run(main())


def test_draining_is_a_result(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            assert (await client.put(b"before", prio=1, delay=0, ttr=5)).inserted
            assert beanstalkd.proc is not None
            beanstalkd.proc.send_signal(signal.SIGUSR1)

            async def draining() -> bool:
                return (await client.stats())["draining"] == "true"

            await _poll(draining)
            assert await client.put(b"after", prio=1, delay=0, ttr=5) == PutResult("DRAINING")
            results = await client.put_batch([PutItem("d", b"x", 1, 0, 5)] * 3)
            assert results == [PutResult("DRAINING")] * 3
        finally:
            await client.close()

    asyncio.run(main())


def test_killed_server_fails_pending_and_later_calls(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        # A reserve that would wait 30 s, and a put pipelined behind it.
        reserve = asyncio.create_task(client.reserve(30))
        put = asyncio.create_task(client.put(b"x", prio=1, delay=0, ttr=5))
        await asyncio.sleep(0.1)
        assert not reserve.done()
        assert not put.done()
        beanstalkd.kill()
        async with asyncio.timeout(5):  # promptly, not after the reserve's 30 s
            for task in (reserve, put):
                with pytest.raises(BeanstalkUnavailable) as info:
                    await task
                assert info.value.__cause__ is not None
        async with asyncio.timeout(1):
            with pytest.raises(BeanstalkUnavailable):
                await client.stats()
            with pytest.raises(BeanstalkUnavailable):
                await client.put_batch([PutItem("t", b"x", 1, 0, 5)])
        await client.close()
        with pytest.raises(BeanstalkUnavailable, match="cannot connect"):
            await BeanstalkClient.connect(beanstalkd.host, beanstalkd.port)

    asyncio.run(main())


def test_silent_server_hits_the_deadline(beanstalkd: BeanstalkdProcess) -> None:
    proc = beanstalkd.proc
    assert proc is not None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = await _client(beanstalkd, op_timeout=0.3)
        try:
            proc.send_signal(signal.SIGSTOP)
            start = loop.time()
            with pytest.raises(BeanstalkUnavailable) as info:
                await client.stats()
            assert isinstance(info.value.__cause__, TimeoutError)
            assert loop.time() - start < 3
            with pytest.raises(BeanstalkUnavailable):
                await client.peek(1)
        finally:
            proc.send_signal(signal.SIGCONT)
            await client.close()

    asyncio.run(main())


def test_unknown_command_raises_then_breaks(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            with pytest.raises(UnknownCommandError) as info:
                await client._call(b"no-such-command\r\n", decode_server_stats)
            assert info.value.status == "UNKNOWN_COMMAND"
            with pytest.raises(BeanstalkUnavailable):
                await client.stats()
        finally:
            await client.close()

    asyncio.run(main())


def test_invalid_arguments_send_nothing(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        try:
            with pytest.raises(ValueError, match="tube name"):
                await client.put_batch(
                    [PutItem("ok", b"x", 1, 0, 5), PutItem("bad tube", b"x", 1, 0, 5)]
                )
            with pytest.raises(ValueError, match="prio"):
                await client.put(b"x", prio=-1, delay=0, ttr=5)
            stats = await client.stats()
            assert stats["cmd-put"] == 0
            assert stats["cmd-use"] == 0
            assert client.using == "default"
        finally:
            await client.close()

    asyncio.run(main())


def test_close_and_connect_refused() -> None:
    async def main() -> None:
        with pytest.raises(BeanstalkUnavailable, match="cannot connect") as info:
            await BeanstalkClient.connect("127.0.0.1", free_port(), timeout=2)
        assert isinstance(info.value.__cause__, OSError)

    asyncio.run(main())


def test_close_fails_later_calls(beanstalkd: BeanstalkdProcess) -> None:
    async def main() -> None:
        client = await _client(beanstalkd)
        assert isinstance((await client.stats())["pid"], int)
        await client.close()
        with pytest.raises(BeanstalkUnavailable, match="closed by the client"):
            await client.stats()
        await client.close()  # twice is harmless

    asyncio.run(main())
