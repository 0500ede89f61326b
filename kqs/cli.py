"""The `kqs` command: thin click wrappers over app.serve and the client."""

from __future__ import annotations

import asyncio
import gc as cyclic_gc
import logging
import os
import ssl
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click
import orjson

from kqs.client import Client, RemoteError
from kqs.config import ServerConfig, load_config, parse_address
from kqs.errors import BeanstalkdMissing, ConfigError

DEFAULT_SERVER = "127.0.0.1:14151"
#: Cyclic-GC thresholds of `kqs serve` and `kqs run` (Python's default: 700, 10, 10).
#: Measured side by side (docs/performance.md): with the default, young-generation
#: collections, run every 700 net allocations, cost the server about a quarter of its
#: inserts/s in arrays of 100 and a few per cent with 64 single-insert clients, and one
#: runner process ~13 % of its jobs/s. kqs makes few reference cycles, so letting more
#: objects accumulate between collections costs little memory.
GC_THRESHOLDS = (50_000, 20, 100)

server_option = click.option(
    "--server",
    "-s",
    default=DEFAULT_SERVER,
    show_default=True,
    envvar="KQS_SERVER",
    help="host:port of a kqs server (env KQS_SERVER).",
)


def _client(server: str) -> Client:
    """A connection to `server`, with the token and TLS given to the `kqs` group."""
    root = click.get_current_context().find_root().params
    tls_ca = root.get("tls_ca")
    context = None
    if root.get("tls") or tls_ca is not None:
        context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
    try:
        host, port = parse_address(server, key="--server")
        return Client(host, port, token=root.get("token") or None, tls=context)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot reach kqs at {server}: {exc.strerror or exc}") from exc


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` (`kqs serve`, `kqs run`) with GC_THRESHOLDS on uvloop (measured: 35-50%
    more inserts/s with 64 clients than the default loop, docs/performance.md);
    KQS_NO_UVLOOP=1 uses the standard loop."""
    cyclic_gc.set_threshold(*GC_THRESHOLDS)
    if os.environ.get("KQS_NO_UVLOOP") != "1":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _print(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _call(server: str, method: str, params: Any = None) -> Any:
    with _client(server) as client:
        try:
            return client.call(method, params)
        except RemoteError as exc:
            raise click.ClickException(f"{exc.code}: {exc.message}") from exc


@click.group()
@click.version_option(package_name="kqs")
@click.option("--token", envvar="KQS_TOKEN", help="auth token for client commands (env KQS_TOKEN).")
@click.option("--tls", is_flag=True, help="client commands connect with TLS (system CAs).")
@click.option(
    "--tls-ca",
    envvar="KQS_TLS_CA",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="CA file to verify the server's certificate (implies --tls; env KQS_TLS_CA).",
)
def main(token: str | None, tls: bool, tls_ca: Path | None) -> None:
    """kqs: a durable job queueing service.

    --token/--tls/--tls-ca apply to the client commands (insert, stats, dead, gc, quit),
    e.g. `kqs --token $T stats`."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--port", type=int)
@click.option("--bind")
@click.option("--beanstalkd", help='"embedded" (default) or host:port of an external beanstalkd.')
def serve(
    config_path: Path | None,
    data_dir: Path | None,
    port: int | None,
    bind: str | None,
    beanstalkd: str | None,
) -> None:
    """Run the server (embedded beanstalkd and local data directory by default)."""
    from kqs.app import serve as run_server

    try:
        config: ServerConfig = load_config(
            config_path,
            {"data_dir": data_dir, "port": port, "bind": bind, "beanstalkd": beanstalkd},
        )
    except ConfigError as exc:
        raise click.ClickException(f"config: {exc}") from exc
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        sys.exit(run_loop(run_server(config)))
    except BeanstalkdMissing as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("type_", metavar="TYPE")
@click.argument("data", required=False)
@click.option("--prio", help="urgent, high, normal, low, bulk or 0..4294967295")
@click.option("--delay", type=int, help="seconds before the job may run")
@click.option("--ttr", type=int, help="seconds a runner may hold the job")
@server_option
def insert(
    type_: str, data: str | None, prio: str | None, delay: int | None, ttr: int | None, server: str
) -> None:
    """Insert one job of TYPE with JSON DATA; print its id once it is durable."""
    job: dict[str, Any] = {"type": type_}
    if data is not None:
        try:
            job["data"] = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise click.BadParameter(f"DATA must be JSON: {exc}") from exc
    if prio is not None:
        job["prio"] = int(prio) if prio.isdigit() else prio
    if delay is not None:
        job["delay"] = delay
    if ttr is not None:
        job["ttr"] = ttr
    click.echo(_call(server, "insert", job)["ids"][0])


@main.command()
@server_option
def stats(server: str) -> None:
    """Print the server's figures as JSON."""
    _print(_call(server, "stats"))


@main.command(name="quit")
@server_option
def quit_(server: str) -> None:
    """Ask a server (on this host) to drain and exit."""
    _print(_call(server, "quit"))


# --- runners and dead jobs (docs/runner.md) ----------------------------------------------


@main.command()
@click.option(
    "--jobs",
    "jobs_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="the job types file (see config/jobs.toml).",
)
@click.option(
    "--server",
    "-s",
    "servers",
    multiple=True,
    envvar="KQS_SERVER",
    help="host:port of a kqs server; repeat for several (default: runner.servers in the"
    f" jobs file, else {DEFAULT_SERVER}; env KQS_SERVER, space-separated).",
)
@click.option(
    "--grace", type=float, help="seconds running jobs get to finish on SIGTERM (default 30)."
)
@click.option(
    "--token",
    envvar="KQS_TOKEN",
    help="the servers' auth_token, sent with `auth` on every connection (env KQS_TOKEN).",
)
@click.option("--tls", is_flag=True, help="connect to the servers with TLS (system CAs).")
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="connect with TLS, trusting the CA certificates in this PEM file.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def run(
    jobs_path: Path,
    servers: tuple[str, ...],
    grace: float | None,
    token: str | None,
    tls: bool,
    tls_ca: Path | None,
    log_level: str,
) -> None:
    """Run the handlers of the job types in --jobs for jobs from every --server."""
    import dataclasses

    from kqs.runner.config import load_runner_config
    from kqs.runner.runner import Runner

    try:
        config = load_runner_config(jobs_path)
    except ConfigError as exc:
        raise click.ClickException(f"jobs: {exc}") from exc
    if grace is not None:
        if not grace >= 0:
            raise click.BadParameter("must be 0 or more seconds", param_hint="--grace")
        config = dataclasses.replace(config, grace=grace)
    chosen = list(servers) or list(config.servers) or [DEFAULT_SERVER]
    for server in chosen:
        try:
            parse_address(server, key="--server")
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from exc
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # handlers import from here, as with `python -m`
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    context: ssl.SSLContext | None = None
    if tls or tls_ca is not None:
        context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
    runner: Runner | None = None

    async def main() -> int:
        nonlocal runner
        runner = Runner(config, chosen, token=token or None, tls=context)
        return await runner.run()

    log = logging.getLogger("kqs.runner")
    try:
        code = run_loop(main())
    except ConfigError as exc:
        raise click.ClickException(f"jobs: {exc}") from exc
    except BaseException as exc:
        # asyncio lets KeyboardInterrupt and SystemExit raised in a task out of the loop
        # (a handler's gather or wait_for can do that), and a bug may end it too: the
        # runner stops, its reserved jobs go back to beanstalkd with its connections.
        if runner is None or not runner.threads_busy:
            raise
        log.critical("stopped by %r; reserved jobs go back to beanstalkd", exc)
        code = _EXIT_CODES.get(type(exc), 1)
    if runner is not None and runner.threads_busy:
        # A sync handler that outlived its time cannot be stopped; its job was released
        # (or goes back with the connection). Do not wait for its thread at exit.
        log.warning(
            "%d sync handler thread(s) still running; exiting without them", runner.threads_busy
        )
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


#: Exit status of `kqs run` stopped by an exception that left the event loop.
_EXIT_CODES: dict[type[BaseException], int] = {KeyboardInterrupt: 130}


@main.group()
def dead() -> None:
    """Inspect, retry and purge dead jobs on a server."""


@dead.command(name="list")
@click.option("--type", "type_", help="only jobs of this type")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--after", help="the 'next' value of the previous page")
@server_option
def dead_list(type_: str | None, limit: int, after: str | None, server: str) -> None:
    """Print a page of dead jobs (oldest first) as JSON: {"jobs": [...], "next": ...}."""
    params: dict[str, Any] = {"limit": limit}
    if type_ is not None:
        params["type"] = type_
    if after is not None:
        params["after"] = after
    _print(_call(server, "dead", params))


def _dead_selection(ids: tuple[str, ...], type_: str | None, all_: bool | None = None) -> Any:
    """The params naming dead jobs: IDs, --type or (where offered, all_ not None) --all;
    exactly one of them."""
    if sum((bool(ids), type_ is not None, bool(all_))) != 1:
        choices = "job IDs, --type TYPE" + (" or --all" if all_ is not None else "")
        raise click.UsageError(f"give exactly one of {choices}")
    if ids:
        return {"ids": list(ids)}
    if type_ is not None:
        return {"type": type_}
    return {"all": True}


@dead.command(name="retry")
@click.argument("ids", nargs=-1)
@click.option("--type", "type_", help="every dead job of this type")
@server_option
def dead_retry(ids: tuple[str, ...], type_: str | None, server: str) -> None:
    """Feed dead jobs again, attempts reset: IDs or --type TYPE."""
    _print(_call(server, "retry", _dead_selection(ids, type_)))


@dead.command(name="purge")
@click.argument("ids", nargs=-1)
@click.option("--type", "type_", help="every dead job of this type")
@click.option("--all", "all_", is_flag=True, help="every dead job")
@server_option
def dead_purge(ids: tuple[str, ...], type_: str | None, all_: bool, server: str) -> None:
    """Remove dead jobs for good: IDs, --type TYPE or --all."""
    _print(_call(server, "purge", _dead_selection(ids, type_, all_)))


@main.command()
@server_option
def gc(server: str) -> None:
    """Delete orphaned bulk payloads (of no unfinished job) older than gc_window, now (admin)."""
    _print(_call(server, "gc"))
