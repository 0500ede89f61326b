"""The `kqs` command: thin click wrappers over app.serve and the client."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from kqs.client import Client, RemoteError
from kqs.config import ServerConfig, load_config, parse_address
from kqs.errors import BeanstalkdMissing, ConfigError

DEFAULT_SERVER = "127.0.0.1:14151"

server_option = click.option(
    "--server",
    "-s",
    default=DEFAULT_SERVER,
    show_default=True,
    envvar="KQS_SERVER",
    help="host:port of a kqs server (env KQS_SERVER).",
)


def _client(server: str) -> Client:
    try:
        host, port = parse_address(server, key="--server")
        return Client(host, port)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot reach kqs at {server}: {exc.strerror or exc}") from exc


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
def main() -> None:
    """kqs: a durable job queueing service."""


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
        sys.exit(asyncio.run(run_server(config)))
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
