from __future__ import annotations

from pathlib import Path

import pytest

from kqs.config import ServerConfig, load_config
from kqs.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "kqs.toml"


def test_example_config_holds_the_defaults() -> None:
    assert load_config(EXAMPLE) == ServerConfig()


def test_no_file_gives_defaults_and_overrides_apply(tmp_path: Path) -> None:
    cfg = load_config(None, {"port": 1234, "data_dir": tmp_path, "bind": None})
    assert cfg.port == 1234 and cfg.data_dir == tmp_path and cfg.bind == "127.0.0.1"
    assert cfg.beanstalkd_address() is None


def test_external_beanstalkd(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('beanstalkd = "10.0.0.5:11300"\n')
    assert load_config(f).beanstalkd_address() == ("10.0.0.5", 11300)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("prot = 1", "prot"),
        ('port = "x"', "port"),
        ("port = 70000", "port"),
        ("port = true", "port"),
        ('beanstalkd = "nohost"', "beanstalkd"),
        ('log_level = "loud"', "log_level"),
        ('node = "a-b"', "node"),
        ("max_line_bytes = 10", "max_line_bytes"),
        ("data_dir = 3", "data_dir"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "k.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key):
        load_config(f)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('tls_cert = "c.pem"', "tls_key"),
        ('auth_token = "short"', "auth_token"),
        ('admin_token = "short"', "admin_token"),
        ('bulk_store = "s3://bucket"', "bulk_store"),
    ],
)
def test_security_and_store_keys_are_checked(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "k.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key):
        load_config(f)
