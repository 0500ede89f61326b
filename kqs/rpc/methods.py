"""Method name -> handler, and who may call it. Handlers are thin: call the service.

A handler gets the service, the request params and the calling connection's `Caller`
and returns the result (JSON-able). Errors are `KqsError`s with wire codes. Access has
three levels: NONE (not yet authenticated: only `auth`), USER (every ordinary method)
and ADMIN (`quit`, `purge`, `gc`, and `retry` of a whole type).

`INLINE` methods change the connection's own state and need no I/O: the server runs
them synchronously, in arrival order, so every later request on the connection (even
one pipelined in the same write) is checked against the state they leave.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from kqs.errors import Forbidden, InvalidParams, Unauthorized
from kqs.service import Service


class Level(IntEnum):
    NONE = 0
    USER = 1
    ADMIN = 2


@dataclass(frozen=True, slots=True)
class Access:
    """The configured tokens; an empty token means that level needs none."""

    token: str = ""
    admin_token: str = ""

    def initial(self) -> Level:
        """The level a new connection starts at."""
        if self.token:
            return Level.NONE
        return Level.USER if self.admin_token else Level.ADMIN

    def level_of(self, presented: str) -> Level:
        """The level a presented token grants (compared in constant time); NONE means a
        wrong token. Without an `auth_token` no token can be wrong: every client already
        has `initial()`, which any token other than the admin token keeps."""
        given = presented.encode()
        if self.admin_token and hmac.compare_digest(given, self.admin_token.encode()):
            return Level.ADMIN
        if self.token and hmac.compare_digest(given, self.token.encode()):
            return Level.USER if self.admin_token else Level.ADMIN
        return Level.NONE if self.token else self.initial()


@dataclass(slots=True)
class Caller:
    """The connection a request came on."""

    peer: str
    loopback: bool
    request_shutdown: Callable[[], None]
    access: Access
    level: Level


Handler = Callable[[Service, Any, Caller], Awaitable[Any]]
InlineHandler = Callable[[Any, Caller], Any]


def require(caller: Caller, level: Level, what: str) -> None:
    if caller.level >= level:
        return
    if caller.level == Level.NONE:
        raise Unauthorized(f"{what} needs authentication: send auth with the server's token")
    raise Forbidden(f"{what} needs the admin token: send auth with it first")


def authenticate(params: Any, caller: Caller) -> Any:
    """`auth`, run inline: raise the caller's level to what the token grants (never
    lower it). Unauthorized for a wrong token; the server then closes the connection."""
    token = params.get("token") if isinstance(params, dict) else None
    if not isinstance(token, str):
        raise InvalidParams('auth takes {"token": "<token>"}')
    level = caller.access.level_of(token)
    if level == Level.NONE:
        raise Unauthorized("wrong token; check the client's token against the server's")
    caller.level = max(caller.level, level)
    return {"admin": caller.level == Level.ADMIN}


async def auth(service: Service, params: Any, caller: Caller) -> Any:
    """The table's entry for `auth`; the server runs `authenticate` inline instead."""
    return authenticate(params, caller)


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


def retry(service: Service, params: Any, caller: Caller) -> Awaitable[Any]:
    """Not a coroutine function: the admin check for a whole type runs when the server
    starts the request, in arrival order, so it sees the access level the lines before
    it left (not one an `auth` pipelined after it raised)."""
    if isinstance(params, dict) and "type" in params:
        require(caller, Level.ADMIN, "retry of a whole type")
    return service.retry(params)


async def purge(service: Service, params: Any, caller: Caller) -> Any:
    return await service.purge(params)


async def gc(service: Service, params: Any, caller: Caller) -> Any:
    return await service.gc()


async def quit_(service: Service, params: Any, caller: Caller) -> Any:
    if not caller.loopback:
        raise Forbidden("quit is accepted only from a loopback address; use SIGTERM remotely")
    caller.request_shutdown()
    return "shutting down"


#: name -> the synchronous handler the server runs in arrival order (see module doc)
INLINE: dict[str, InlineHandler] = {"auth": authenticate}

#: name -> (handler, level needed)
METHODS: dict[str, tuple[Handler, Level]] = {
    "auth": (auth, Level.NONE),
    "ping": (ping, Level.USER),
    "echo": (echo, Level.USER),
    "insert": (insert, Level.USER),
    "finish": (finish, Level.USER),
    "stats": (stats, Level.USER),
    "hello": (hello, Level.USER),
    "dead": (dead, Level.USER),
    "retry": (retry, Level.USER),
    "purge": (purge, Level.ADMIN),
    "gc": (gc, Level.ADMIN),
    "quit": (quit_, Level.ADMIN),
}
