"""Server configuration: TOML (tomllib), validated at load with errors that name the key.

Every key is documented in docs/config.md. Command-line options override the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kqs.errors import ConfigError
from kqs.model import MAX_SECONDS, NODE_RE
from kqs.store.url import file_store_dir, open_store

EMBEDDED = "embedded"
MIN_TOKEN = 16


@dataclass(frozen=True, slots=True)
class ServerConfig:
    node: str = ""  # empty: a random name made once and kept in data_dir/node
    bind: str = "127.0.0.1"
    port: int = 14151
    data_dir: Path = Path("kqs-data")
    beanstalkd: str = EMBEDDED  # or "host:port" of an external beanstalkd
    beanstalkd_binary: str = "beanstalkd"
    beanstalkd_port: int = 0  # embedded only; 0 picks a free loopback port
    max_job_size: int = 65535  # embedded only: beanstalkd -z
    max_line_bytes: int = 17 * 2**20
    max_jobs_per_insert: int = 10_000
    max_inflight_per_connection: int = 1024
    max_connections: int = 4096
    idle_timeout: int = 300
    line_timeout: int = 30
    write_timeout: int = 60
    auth_token: str = ""
    admin_token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    default_ttr: int = 30
    segment_bytes: int = 64 * 2**20
    feeder_batch: int = 1000
    bulk_store: str = ""  # empty: file store in data_dir/bulk; or file:///path, mongodb://...
    max_payload_bytes: int = 16 * 2**20
    gc_window: int = 3600
    gc_interval: int = 3600
    log_level: str = "info"

    def bulk_url(self) -> str:
        """The bulk store URL, with a directory in data_dir (the default, or a relative
        `file:` URL) made absolute: runners are given this URL and cannot resolve one
        relative to the server's data directory."""
        url = self.bulk_store or "file:bulk"
        if not url.lower().startswith("file:") or urlsplit(url).path.startswith("/"):
            return url
        return file_store_dir(url, data_dir=self.data_dir).resolve().as_uri()

    def beanstalkd_address(self) -> tuple[str, int] | None:
        """(host, port) of an external beanstalkd, or None for the embedded one."""
        if self.beanstalkd == EMBEDDED:
            return None
        return parse_address(self.beanstalkd, key="beanstalkd")


# key -> (low, high) for integer keys
_RANGES: dict[str, tuple[int, int]] = {
    "port": (0, 65535),
    "beanstalkd_port": (0, 65535),
    "max_job_size": (1024, 2**30),
    "max_line_bytes": (1024, 2**31),
    "max_jobs_per_insert": (1, 1_000_000),
    "max_inflight_per_connection": (1, 1_000_000),
    "max_connections": (1, 1_000_000),
    "idle_timeout": (1, 7 * 86400),
    "line_timeout": (1, 86400),
    "write_timeout": (1, 86400),
    "default_ttr": (1, MAX_SECONDS),
    "segment_bytes": (4096, 2**34),
    "feeder_batch": (1, 100_000),
    "max_payload_bytes": (1024, 2**30),
    "gc_window": (60, 10 * 365 * 86400),
    "gc_interval": (10, 10 * 365 * 86400),
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_address(text: str, *, key: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port (e.g. 127.0.0.1:11300)")
    return host.strip("[]"), int(port)


def _check(key: str, value: Any, default: Any) -> Any:
    """Validate one key's value against the type of its default; return it converted."""
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string, got {value!r}")
        return Path(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        low, high = _RANGES[key]
        if not low <= value <= high:
            raise ConfigError(f"{key}: must be from {low} to {high}, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    if key == "node" and value and NODE_RE.fullmatch(value) is None:
        raise ConfigError(f"node: {value!r} must be 1-32 characters of A-Z a-z 0-9 _ .")
    if key == "log_level" and value not in _LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    if key == "beanstalkd" and value != EMBEDDED:
        parse_address(value, key="beanstalkd")
    if key == "bulk_store" and value:
        _check_bulk_store(value)
    return value


def _check_bulk_store(url: str) -> None:
    """ConfigError naming `bulk_store` for a URL the server could not use: one the
    store parser (kqs.store.url) refuses, or `memory:`, whose payloads would be lost on
    restart and which runners could not read. Parses only: opens and connects nothing."""
    if url.lower().startswith("memory:"):
        raise ConfigError(
            "bulk_store: memory: keeps payloads in the server's memory only (lost on restart,"
            " unreachable by runners); it is for tests of the store itself. Use"
            " file:///absolute/dir or mongodb://host:27017/db"
        )
    try:
        open_store(url, data_dir=Path("."))  # builds the store object; no I/O until used
    except ValueError as exc:
        raise ConfigError(f"bulk_store: {exc}") from exc


def build_config(values: dict[str, Any]) -> ServerConfig:
    """Make a validated ServerConfig from a flat mapping (file contents plus overrides)."""
    defaults = ServerConfig()
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(values.keys() - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}"
        )
    checked = {k: _check(k, v, getattr(defaults, k)) for k, v in values.items()}
    config = dataclasses.replace(defaults, **checked)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert, tls_key: give both (PEM files) or neither")
    for key in ("auth_token", "admin_token"):
        token = getattr(config, key)
        if token and len(token) < MIN_TOKEN:
            raise ConfigError(f"{key}: at least {MIN_TOKEN} characters (use a random secret)")
    return config


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Read `path` (TOML, may be None) and apply `overrides` (None values are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = str(value) if isinstance(value, Path) else value
    return build_config(values)
