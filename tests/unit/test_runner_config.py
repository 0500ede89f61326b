"""jobs.toml: parsed and validated at load, errors naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from kqs.errors import ConfigError
from kqs.runner.config import (
    DEFAULT_CONCURRENCY,
    CommandTarget,
    PythonTarget,
    load_runner_config,
    parse_runner_config,
)
from kqs.runner.retry import RetryPolicy

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "jobs.toml"

ISSUE_EXAMPLE = """
[types.resize-image]
handler = "myapp.images:resize"      # a Python callable, sync or async
concurrency = 8
ttr = 120
retry = { max_attempts = 10, backoff = "exponential", base = 2, cap = 3600 }

[types.send-mail]
command = ["/usr/local/bin/send-mail", "--json"]   # a shell command: the job on stdin
timeout = 60
"""


def parse(text: str) -> Any:
    return parse_runner_config(tomllib.loads(text))


def test_the_issue_example() -> None:
    config = parse(ISSUE_EXAMPLE)
    resize = config.types["resize-image"]
    assert resize.handler == PythonTarget("myapp.images:resize")
    assert resize.concurrency == 8
    assert resize.timeout == 120.0  # `ttr` is another name for `timeout`
    assert resize.retry == RetryPolicy(max_attempts=10, backoff="exponential", base=2, cap=3600)
    mail = config.types["send-mail"]
    assert mail.handler == CommandTarget(("/usr/local/bin/send-mail", "--json"), 100)
    assert mail.timeout == 60.0
    assert mail.concurrency == DEFAULT_CONCURRENCY
    assert mail.retry == RetryPolicy()
    assert config.servers == ()
    assert config.grace == 30.0
    assert config.total_concurrency == 8 + DEFAULT_CONCURRENCY


def test_the_shipped_example_file_loads() -> None:
    config = load_runner_config(EXAMPLE)
    assert config.types


def test_runner_table() -> None:
    config = parse('[runner]\nservers = ["a:1", "b:2"]\ngrace = 5\n[types.t]\nhandler = "m:f"\n')
    assert config.servers == ("a:1", "b:2")
    assert config.grace == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[types.send-mail]\ncommand = ["x"]\ntimeout = -1', "types.send-mail.timeout: "),
        ('[types.send-mail]\ncommand = ["x"]\ntimeout = "60"', "types.send-mail.timeout: "),
        ('[types.t]\nhandler = "m:f"\nttr = 0', "types.t.ttr: "),
        ('[types.t]\nhandler = "m:f"\nttr = 5\ntimeout = 5', "types.t.ttr: is another name"),
        ('[types.t]\nhandler = "m:f"\nconcurrency = 0', "types.t.concurrency: "),
        ('[types.t]\nhandler = "m:f"\nconcurrency = true', "types.t.concurrency: "),
        ("[types.t]\nconcurrency = 1", "types.t.handler: set exactly one"),
        ('[types.t]\nhandler = "m:f"\ncommand = ["x"]', "types.t.handler: set exactly one"),
        ('[types.t]\nhandler = "no-colon"', 'types.t.handler: must be "module:function"'),
        ('[types.t]\nhandler = "m:"', "types.t.handler: "),
        ('[types.t]\nhandler = "a b:f"', "types.t.handler: "),
        ("[types.t]\ncommand = []", "types.t.command: must be a non-empty array"),
        ('[types.t]\ncommand = "send-mail"', "types.t.command: "),
        ('[types.t]\ncommand = ["x"]\ndead_exit_code = 0', "types.t.dead_exit_code: "),
        ('[types.t]\nhandler = "m:f"\ndead_exit_code = 3', "types.t.dead_exit_code: applies"),
        ('[types.t]\nhandler = "m:f"\nretries = 3', "types.t.retries: unknown key"),
        ('[types.t]\nhandler = "m:f"\nretry = 3', "types.t.retry: must be a table"),
        (
            '[types.t]\nhandler = "m:f"\nretry = { max_attempts = 0 }',
            "types.t.retry.max_attempts: must be an integer from 1",
        ),
        (
            '[types.t]\nhandler = "m:f"\nretry = { backoff = "random" }',
            "types.t.retry.backoff: must be one of",
        ),
        (
            '[types.t]\nhandler = "m:f"\nretry = { base = 10, cap = 5 }',
            "types.t.retry.cap: must be at least base",
        ),
        ('[types.t]\nhandler = "m:f"\nretry = { tries = 3 }', "types.t.retry.tries: unknown"),
        ('[types."-bad"]\nhandler = "m:f"', "types.-bad: a type name"),
        ('[types."a b"]\nhandler = "m:f"', "types.a b: a type name"),
        ("[types.t]", "types.t.handler"),
        ("types = 3", "types: must be a table"),
        ("", "types: no job types configured"),
        ('workers = 3\n[types.t]\nhandler = "m:f"', "workers: unknown key"),
        ('[runner]\nservers = "a:1"\n[types.t]\nhandler = "m:f"', "runner.servers: "),
        ('[runner]\nservers = ["nope"]\n[types.t]\nhandler = "m:f"', "runner.servers: "),
        ('[runner]\ngrace = -1\n[types.t]\nhandler = "m:f"', "runner.grace: "),
        ('[runner]\nthreads = 2\n[types.t]\nhandler = "m:f"', "runner.threads: unknown key"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text)
    text = str(err.value)
    assert message in text, text
    assert text.startswith(message.split(":")[0]), text  # the key comes first


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read jobs file"):
        load_runner_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[types.t\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_runner_config(bad)
