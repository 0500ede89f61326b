"""The `kqs` command against a real server."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.integration.helpers import kqs_cli
from tests.support import BeanstalkdProcess, KqsProcess


def test_insert_and_stats(kqs: KqsProcess) -> None:
    server = f"127.0.0.1:{kqs.port}"
    out = kqs_cli("insert", "mail", '{"to": "a@b"}', "--prio", "high", "--server", server)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert job_id.rpartition("-")[2]
    stats = kqs_cli("stats", "--server", server)
    assert stats.returncode == 0
    assert orjson.loads(stats.stdout)["accepted"] == 1


def test_insert_errors_are_clear(kqs: KqsProcess) -> None:
    server = f"127.0.0.1:{kqs.port}"
    out = kqs_cli("insert", "bad type", "--server", server)
    assert out.returncode != 0 and "invalid_params" in out.stderr
    out = kqs_cli("insert", "t", "{not json", "--server", server)
    assert out.returncode != 0 and "JSON" in out.stderr


def test_unreachable_server_is_a_clear_error() -> None:
    out = kqs_cli("stats", "--server", "127.0.0.1:1")
    assert out.returncode != 0 and "cannot reach kqs" in out.stderr


def test_missing_beanstalkd_binary_says_how_to_install(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text('beanstalkd_binary = "/nonexistent/beanstalkd"\n')
    out = kqs_cli(
        "serve", "--config", str(config), "--data-dir", str(tmp_path / "d"), "--port", "0"
    )
    assert out.returncode != 0
    assert "apt-get install beanstalkd" in out.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text("max_jobs_per_insert = 0\n")
    out = kqs_cli("serve", "--config", str(config))
    assert out.returncode != 0 and "max_jobs_per_insert" in out.stderr


def test_client_commands_send_the_token(tmp_path: Path, beanstalkd: BeanstalkdProcess) -> None:
    token = "cli-token-0123456789"
    server = KqsProcess(
        tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}", auth_token=token
    )
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        refused = kqs_cli("stats", "--server", address)
        assert refused.returncode != 0 and "unauthorized" in refused.stderr
        ok = kqs_cli("--token", token, "insert", "t", "--server", address)
        assert ok.returncode == 0, ok.stderr
        assert kqs_cli("--token", token, "gc", "--server", address).returncode == 0
    finally:
        server.kill()
