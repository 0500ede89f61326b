"""A small TCP fault proxy for tests: asyncio, loopback only, in a thread of its own.

`FaultProxy(target)` listens on 127.0.0.1:`port` and forwards every connection to
`target`. Each chunk read in either direction draws its fate from the current `Chaos`
(probabilities per chunk):

- `delay`: held back up to `max_delay` seconds (later chunks queue behind it: order kept);
- `reset`: a random prefix of the chunk is forwarded, then both sides are reset (RST);
- `close`: a random prefix is forwarded, then both sides are closed cleanly (FIN);
- `stall`: the connection goes silent both ways (data is dropped, nothing is closed)
  for up to `max_stall` seconds, then it is reset: a black hole, bounded in time.

`set(Chaos())` turns faults off; `reset_all()` resets every open connection at once.
`stats` counts connections and faults injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Chaos:
    delay: float = 0.0
    max_delay: float = 0.05
    reset: float = 0.0
    close: float = 0.0
    stall: float = 0.0
    max_stall: float = 2.0


class _Link:
    """One proxied connection: both writers, and whether it is stalled."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)
        self.stalled = False
        self.done = asyncio.Event()

    def reset(self) -> None:
        """Close both sides with RST (SO_LINGER 0)."""
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        self.done.set()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.done.set()


class FaultProxy:
    def __init__(
        self, target: tuple[str, int], chaos: Chaos | None = None, seed: int | None = None
    ):
        self.target = target
        self.chaos = chaos or Chaos()
        self.port = 0
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fault-proxy", daemon=True)

    # -- control (any thread) -----------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("proxy did not start")
        return self

    def set(self, chaos: Chaos) -> None:
        self.chaos = chaos  # one reference assignment: atomic

    def reset_all(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._reset_all)

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop thread ----------------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopped.wait()
        self._server.close()
        self._reset_all()
        await self._server.wait_closed()

    def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()
            self.stats["resets"] += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            self.stats["upstream_refused"] += 1
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.ALL_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.transport.abort()
            self._links.discard(link)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Forward one direction until EOF or a fault ends the link."""
        try:
            while not link.done.is_set():
                data = await reader.read(65536)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if link.stalled:
                    continue  # a black hole: dropped
                if await self._fault(data, writer, link):
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            link.reset()

    async def _fault(self, data: bytes, writer: asyncio.StreamWriter, link: _Link) -> bool:
        """Apply the chunk's fate; True if the link ended (the chunk is then handled)."""
        chaos, rng = self.chaos, self._rng
        r = rng.random()
        if r < chaos.reset or r < chaos.reset + chaos.close:
            writer.write(data[: rng.randrange(len(data))])  # part of it may get through
            with contextlib.suppress(OSError, RuntimeError):
                await writer.drain()
            if r < chaos.reset:
                self.stats["resets"] += 1
                link.reset()
            else:
                self.stats["closes"] += 1
                link.close()
            return True
        r -= chaos.reset + chaos.close
        if r < chaos.stall:
            self.stats["stalls"] += 1
            link.stalled = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.done.wait(), rng.uniform(0, chaos.max_stall))
            link.reset()
            return True
        r -= chaos.stall
        if r < chaos.delay:
            self.stats["delays"] += 1
            await asyncio.sleep(rng.uniform(0, chaos.max_delay))
        return False
