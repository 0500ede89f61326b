"""The runner's job-type configuration (jobs.toml), validated at load.

Every error is a `ConfigError` whose message starts with the full key, for example
`types.send-mail.timeout: must be a number of seconds above 0, got -1`. The keys are
documented in docs/runner.md; config/jobs.toml is a commented example.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kqs.config import parse_address
from kqs.errors import ConfigError
from kqs.model import MAX_SECONDS, TUBE_RE
from kqs.runner.retry import RetryPolicy

DEFAULT_CONCURRENCY: Final = 10
MAX_CONCURRENCY: Final = 100_000
DEFAULT_GRACE: Final = 30.0
DEFAULT_DEAD_EXIT_CODE: Final = 100

TYPE_KEYS: Final = frozenset(
    {"handler", "command", "concurrency", "timeout", "ttr", "retry", "dead_exit_code"}
)
RETRY_KEYS: Final = frozenset({"max_attempts", "backoff", "base", "factor", "cap", "jitter"})
RUNNER_KEYS: Final = frozenset({"servers", "grace"})
TOP_KEYS: Final = frozenset({"types", "runner"})


@dataclass(frozen=True, slots=True)
class PythonTarget:
    """A Python callable named `module:function` (imported when the runner starts)."""

    target: str


@dataclass(frozen=True, slots=True)
class CommandTarget:
    """An external command: argv, and the exit code that means "dead, do not retry"."""

    argv: tuple[str, ...]
    dead_exit_code: int = DEFAULT_DEAD_EXIT_CODE


@dataclass(frozen=True, slots=True)
class TypeConfig:
    """How jobs of one type (one beanstalkd tube) are run."""

    name: str
    handler: PythonTarget | CommandTarget
    concurrency: int = DEFAULT_CONCURRENCY
    #: seconds one run may take; None: commands get the job's TTR, Python handlers no limit
    timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    types: dict[str, TypeConfig]
    servers: tuple[str, ...] = ()
    grace: float = DEFAULT_GRACE

    @property
    def total_concurrency(self) -> int:
        return sum(t.concurrency for t in self.types.values())


def _unknown(keys: Any, allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(keys) - allowed)
    if unknown:
        names = ", ".join(f"{where}{k}" for k in unknown)
        raise ConfigError(f"{names}: unknown key; the keys are {', '.join(sorted(allowed))}")


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table, got {value!r}")
    return value


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _seconds(value: Any, key: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_SECONDS
    ):
        raise ConfigError(f"{key}: must be a number of seconds above 0, got {value!r}")
    return float(value)


def _handler(raw: dict[str, Any], where: str) -> PythonTarget | CommandTarget:
    """The one of `handler` / `command` that is set, checked."""
    if ("handler" in raw) == ("command" in raw):
        raise ConfigError(
            f'{where}handler: set exactly one of handler = "module:function"'
            ' or command = ["program", "arg", ...]'
        )
    if "handler" in raw:
        target = raw["handler"]
        module, sep, func = target.partition(":") if isinstance(target, str) else ("", "", "")
        if (
            not sep
            or not module
            or not func
            or not all(part.isidentifier() for part in (*module.split("."), *func.split(".")))
        ):
            raise ConfigError(
                f'{where}handler: must be "module:function" (e.g. "myapp.jobs:resize"),'
                f" got {target!r}"
            )
        if "dead_exit_code" in raw:
            raise ConfigError(f"{where}dead_exit_code: applies to command handlers only")
        return PythonTarget(target)
    argv = raw["command"]
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) for a in argv)
        or not argv[0]
    ):
        raise ConfigError(
            f'{where}command: must be a non-empty array of strings (["program", "arg", ...]),'
            f" got {argv!r}"
        )
    code = _int(raw.get("dead_exit_code", DEFAULT_DEAD_EXIT_CODE), f"{where}dead_exit_code", 1, 255)
    return CommandTarget(tuple(argv), code)


def _retry(value: Any, key: str) -> RetryPolicy:
    raw = _table(value, key)
    _unknown(raw, RETRY_KEYS, f"{key}.")
    try:
        return RetryPolicy(**raw)
    except ValueError as exc:
        raise ConfigError(f"{key}.{exc}") from None


def parse_type(name: str, value: Any) -> TypeConfig:
    """Validate one `[types.<name>]` table."""
    where = f"types.{name}."
    if TUBE_RE.fullmatch(name) is None:
        raise ConfigError(
            f"types.{name}: a type name must be 1-200 characters of"
            " A-Z a-z 0-9 - + / ; . $ _ ( ), not starting with '-'"
        )
    raw = _table(value, f"types.{name}")
    _unknown(raw, TYPE_KEYS, where)
    if "timeout" in raw and "ttr" in raw:
        raise ConfigError(f"{where}ttr: is another name for timeout; set only one of them")
    timeout_key = "ttr" if "ttr" in raw else "timeout"
    timeout = raw.get(timeout_key)
    return TypeConfig(
        name=name,
        handler=_handler(raw, where),
        concurrency=_int(
            raw.get("concurrency", DEFAULT_CONCURRENCY), f"{where}concurrency", 1, MAX_CONCURRENCY
        ),
        timeout=None if timeout is None else _seconds(timeout, where + timeout_key),
        retry=_retry(raw["retry"], f"{where}retry") if "retry" in raw else RetryPolicy(),
    )


def parse_runner_config(data: dict[str, Any]) -> RunnerConfig:
    """Validate a whole jobs.toml document (already parsed)."""
    _unknown(data, TOP_KEYS, "")
    types_raw = _table(data.get("types", {}), "types")
    if not types_raw:
        raise ConfigError("types: no job types configured; add a [types.<name>] table")
    types = {name: parse_type(name, value) for name, value in types_raw.items()}
    runner = _table(data.get("runner", {}), "runner")
    _unknown(runner, RUNNER_KEYS, "runner.")
    servers = runner.get("servers", [])
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise ConfigError(f'runner.servers: must be an array of "host:port", got {servers!r}')
    for server in servers:
        parse_address(server, key="runner.servers")
    grace = _nonnegative(runner.get("grace", DEFAULT_GRACE), "runner.grace")
    return RunnerConfig(types=types, servers=tuple(servers), grace=grace)


def _nonnegative(value: Any, key: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{key}: must be a number of seconds, 0 or more, got {value!r}")
    return float(value)


def load_runner_config(path: Path) -> RunnerConfig:
    """Read and validate a jobs.toml file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read jobs file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_runner_config(data)
