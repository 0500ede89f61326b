"""What a load-generator client talks to: one class per system, each a picklable recipe.

A target opens a *session* (one client connection). `session.send(n)` issues one request
carrying `n` jobs and returns once it is acknowledged, raising on an error reply:

- `KqsInsert`: a kqs `insert`, one job object or an array of `n` (asyncio, raw stream).
- `BeanstalkPut`: `n` pipelined beanstalkd `put`s (asyncio, the raw text protocol).
- `GreenstalkPut`: greenstalk's synchronous `put` (one round trip each; threads).
- `RqEnqueue`: RQ `Queue.enqueue`, or `enqueue_many` (one Redis pipeline) for `n` > 1.

With `stamp`, each job carries the wall-clock time it was sent (`t`), which the
end-to-end handlers turn into an insert-to-done latency.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

PAYLOAD_BYTES = 100
JOB_TYPE = "bench"
RQ_FUNC = "benchlib.handlers.rq_record"


def payload(size: int = PAYLOAD_BYTES) -> dict[str, Any]:
    """A JSON object whose compact encoding is exactly `size` bytes (at least 24)."""
    empty = len(orjson.dumps({"t": 0.0, "pad": ""}))
    return {"t": 0.0, "pad": "x" * (size - empty)}


def stamped(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "t": time.time()}


class AsyncSession(Protocol):
    async def send(self, n: int) -> None: ...

    async def close(self) -> None: ...


class SyncSession(Protocol):
    def send(self, n: int) -> None: ...

    def close(self) -> None: ...


class ReplyError(RuntimeError):
    """The server answered with an error (counted, never acknowledged)."""


# -- kqs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KqsInsert:
    port: int
    size: int = PAYLOAD_BYTES
    delay: int = 0
    stamp: bool = False
    job_type: str = JOB_TYPE
    engine: ClassVar[str] = "async"
    name: ClassVar[str] = "kqs"

    def job(self) -> dict[str, Any]:
        data = payload(self.size)
        job: dict[str, Any] = {"type": self.job_type, "data": data}
        if self.delay:
            job["delay"] = self.delay
        return job

    async def open(self) -> AsyncSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**24)
        return _KqsSession(self, reader, writer)


class _KqsSession:
    def __init__(
        self, target: KqsInsert, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.target = target
        self.reader = reader
        self.writer = writer
        self.next_id = 0
        job = target.job()
        self.one = orjson.dumps(job)
        self.many: dict[int, bytes] = {}

    def params(self, n: int) -> bytes:
        if self.target.stamp:
            job = self.target.job()
            job["data"] = stamped(job["data"])
            return orjson.dumps(job if n == 1 else [job] * n)
        if n == 1:
            return self.one
        if n not in self.many:
            self.many[n] = b"[" + b",".join([self.one] * n) + b"]"
        return self.many[n]

    async def send(self, n: int) -> None:
        self.next_id += 1
        line = b'{"id":%d,"method":"insert","params":%b}\n' % (self.next_id, self.params(n))
        self.writer.write(line)
        reply = await self.reader.readline()
        if not reply:
            raise ConnectionError("kqs closed the connection")
        if b'"error"' in reply[:64]:
            raise ReplyError(reply[:300].decode(errors="replace"))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# -- beanstalkd, raw protocol --------------------------------------------------------------


@dataclass(frozen=True)
class BeanstalkPut:
    port: int
    size: int = PAYLOAD_BYTES
    stamp: bool = False
    tube: str = JOB_TYPE
    engine: ClassVar[str] = "async"
    name: ClassVar[str] = "beanstalkd"

    async def open(self) -> AsyncSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"use %b\r\n" % self.tube.encode())
        if not (await reader.readline()).startswith(b"USING"):
            raise ReplyError("beanstalkd refused `use`")
        return _BeanstalkSession(self, reader, writer)


class _BeanstalkSession:
    def __init__(
        self, target: BeanstalkPut, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.target = target
        self.reader = reader
        self.writer = writer
        self.put = self.command(payload(target.size))

    @staticmethod
    def command(data: dict[str, Any]) -> bytes:
        body = orjson.dumps(data)
        return b"put 10000 0 60 %d\r\n%b\r\n" % (len(body), body)

    async def send(self, n: int) -> None:
        put = self.command(stamped(payload(self.target.size))) if self.target.stamp else self.put
        self.writer.write(put * n)
        for _ in range(n):
            reply = await self.reader.readline()
            if not reply.startswith(b"INSERTED"):
                raise ReplyError(reply.decode(errors="replace"))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# -- beanstalkd, greenstalk ------------------------------------------------------------------


@dataclass(frozen=True)
class GreenstalkPut:
    port: int
    size: int = PAYLOAD_BYTES
    stamp: bool = False
    tube: str = JOB_TYPE
    engine: ClassVar[str] = "thread"
    name: ClassVar[str] = "greenstalk"

    def open(self) -> SyncSession:
        return _GreenstalkSession(self)


class _GreenstalkSession:
    def __init__(self, target: GreenstalkPut) -> None:
        import greenstalk

        self.target = target
        self.client = greenstalk.Client(("127.0.0.1", target.port), use=target.tube, encoding=None)
        self.body = orjson.dumps(payload(target.size))

    def send(self, n: int) -> None:
        for _ in range(n):
            body = orjson.dumps(stamped(payload(self.target.size))) if self.target.stamp else None
            self.client.put(body or self.body, priority=10000, ttr=60)

    def close(self) -> None:
        self.client.close()


# -- RQ ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RqEnqueue:
    url: str
    size: int = PAYLOAD_BYTES
    stamp: bool = False
    queue: str = JOB_TYPE
    engine: ClassVar[str] = "thread"
    name: ClassVar[str] = "rq"

    def open(self) -> SyncSession:
        return _RqSession(self)


class _RqSession:
    def __init__(self, target: RqEnqueue) -> None:
        from redis import Redis  # type: ignore[import-not-found,unused-ignore]
        from rq import Queue  # type: ignore[import-not-found,unused-ignore]

        self.target = target
        self.redis = Redis.from_url(target.url)
        self.queue = Queue(target.queue, connection=self.redis)
        self.data = payload(target.size)

    def send(self, n: int) -> None:
        from rq import Queue  # type: ignore[import-not-found,unused-ignore]

        data = stamped(self.data) if self.target.stamp else self.data
        if n == 1:
            self.queue.enqueue(RQ_FUNC, data)
            return
        jobs = [Queue.prepare_data(RQ_FUNC, (data,)) for _ in range(n)]
        self.queue.enqueue_many(jobs)

    def close(self) -> None:
        self.redis.close()


Target = KqsInsert | BeanstalkPut | GreenstalkPut | RqEnqueue
