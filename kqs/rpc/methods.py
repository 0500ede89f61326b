"""Method name -> handler. Handlers are thin: check the caller, call the service.

A handler gets the service, the request params and the calling connection's `Caller`
and returns the result (JSON-able). Errors are `KqsError`s with wire codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kqs.errors import Forbidden
from kqs.service import Service


@dataclass(frozen=True, slots=True)
class Caller:
    peer: str
    loopback: bool
    request_shutdown: Callable[[], None]


Handler = Callable[[Service, Any, Caller], Awaitable[Any]]


async def ping(service: Service, params: Any, caller: Caller) -> Any:
    return "pong"


async def echo(service: Service, params: Any, caller: Caller) -> Any:
    return params


async def insert(service: Service, params: Any, caller: Caller) -> Any:
    return {"ids": await service.insert(service.parse_insert(params))}


async def finish(service: Service, params: Any, caller: Caller) -> Any:
    return await service.finish(params)


async def stats(service: Service, params: Any, caller: Caller) -> Any:
    return await service.stats()


async def hello(service: Service, params: Any, caller: Caller) -> Any:
    return service.hello()


async def dead(service: Service, params: Any, caller: Caller) -> Any:
    return await service.dead(params)


async def retry(service: Service, params: Any, caller: Caller) -> Any:
    return await service.retry(params)


async def purge(service: Service, params: Any, caller: Caller) -> Any:
    return await service.purge(params)


async def gc(service: Service, params: Any, caller: Caller) -> Any:
    return await service.gc()


async def quit_(service: Service, params: Any, caller: Caller) -> Any:
    if not caller.loopback:
        raise Forbidden("quit is accepted only from a loopback address; use SIGTERM remotely")
    caller.request_shutdown()
    return "shutting down"


METHODS: dict[str, Handler] = {
    "ping": ping,
    "echo": echo,
    "insert": insert,
    "finish": finish,
    "stats": stats,
    "hello": hello,
    "dead": dead,
    "retry": retry,
    "purge": purge,
    "gc": gc,
    "quit": quit_,
}
