from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kqs.app import _warn_if_exposed, node_name
from kqs.config import ServerConfig, build_config, load_config
from kqs.errors import ConfigError
from kqs.journal.diskio import DiskIO
from kqs.model import NODE_RE

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


# --- bulk_store: the whole URL is checked at load ------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file://otherhost/x", "host 'otherhost' is not allowed"),
        ("file:", "no directory"),
        ("file:///x?sync=0", "no query"),
        ("memory:", "lost on restart"),
        ("memory://", "lost on restart"),
        ("MEMORY://", "lost on restart"),
        ("mongodb://db.example:27017/kqs?w=0", "acknowledged"),
        ("mongodb://db.example:27017/kqs?noSuchOption=1", "noSuchOption"),
        ("mongodb://", "bad MongoDB"),
        ("mongodb+srv://a.example:27017/kqs", "bad MongoDB"),  # an SRV URL takes no port
        ("s3://bucket", "scheme must be one of"),
        ("/var/lib/kqs/bulk", "scheme must be one of"),
    ],
)
def test_a_bulk_store_url_the_server_cannot_use_is_refused_at_load(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^bulk_store: ") as err:
        build_config({"bulk_store": url})
    assert why in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "file:///var/lib/kqs/bulk",
        "file://localhost/var/lib/kqs/bulk",
        "file:relative/dir",
        "mongodb://db.example:27017/kqs",
        "mongodb://u:p@a.example,b.example/kqs?replicaSet=rs0&w=majority",
        "mongodb+srv://cluster0.example.net/kqs",  # no DNS lookup at load
    ],
)
def test_usable_bulk_store_urls_are_accepted(url: str) -> None:
    assert build_config({"bulk_store": url}).bulk_store == url


def test_the_bulk_url_given_to_runners_is_absolute(tmp_path: Path) -> None:
    relative = build_config({"bulk_store": "file:payloads", "data_dir": str(tmp_path)})
    assert relative.bulk_url() == (tmp_path / "payloads").resolve().as_uri()
    default = build_config({"data_dir": str(tmp_path)})
    assert default.bulk_url() == (tmp_path / "bulk").resolve().as_uri()
    absolute = build_config({"bulk_store": "file:///srv/bulk", "data_dir": str(tmp_path)})
    assert absolute.bulk_url() == "file:///srv/bulk"


def test_kqs_serve_with_a_bad_bulk_store_says_which_key(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('bulk_store = "file://otherhost/x"\n')
    args = [sys.executable, "-m", "kqs", "serve", "--config", str(f), "--data-dir", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "bulk_store" in done.stderr and "otherhost" in done.stderr
    assert "Traceback" not in done.stderr


# --- the node file and the exposure warning (kqs.app) ---------------------------------------


class RecordingIO(DiskIO):
    """Records the durability-relevant calls, in order, as (call, file name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.names: dict[int, str] = {}

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        self.names[fd] = path.name
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.calls.append(("write", self.names[fd]))
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self.calls.append(("fsync", self.names[fd]))
        super().fsync(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self.calls.append(("rename", f"{src.name}->{dst.name}"))
        super().rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        self.calls.append(("fsync_dir", path.name))
        super().fsync_dir(path)


def test_the_node_file_is_written_durably_once(tmp_path: Path) -> None:
    config = build_config({"data_dir": str(tmp_path / "data")})
    config.data_dir.mkdir()
    io = RecordingIO()
    name = node_name(config, io=io)
    assert NODE_RE.fullmatch(name)
    assert io.calls == [
        ("write", "node.tmp"),
        ("fsync", "node.tmp"),
        ("rename", "node.tmp->node"),
        ("fsync_dir", "data"),
    ]
    assert (config.data_dir / "node").read_text() == name + "\n"
    assert sorted(p.name for p in config.data_dir.iterdir()) == ["node"]
    again = RecordingIO()
    assert node_name(config, io=again) == name and again.calls == []  # kept, not rewritten


def test_the_node_name_from_the_config_writes_nothing(tmp_path: Path) -> None:
    io = RecordingIO()
    assert node_name(build_config({"node": "n1", "data_dir": str(tmp_path)}), io=io) == "n1"
    assert io.calls == [] and list(tmp_path.iterdir()) == []


EXPOSED = "beyond loopback, with no auth_token"


@pytest.mark.parametrize(
    ("values", "warns"),
    [
        ({"bind": "0.0.0.0"}, True),
        ({"bind": "192.0.2.10"}, True),
        ({"bind": "::"}, True),
        ({"bind": "db.example"}, True),
        ({"bind": "0.0.0.0", "auth_token": "t" * 16}, False),
        ({"bind": "127.0.0.1"}, False),
        ({"bind": "::1"}, False),
        ({"bind": "localhost"}, False),
    ],
)
def test_listening_beyond_loopback_without_a_token_warns_loudly(
    caplog: pytest.LogCaptureFixture, values: dict[str, Any], warns: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="kqs"):
        _warn_if_exposed(build_config(values))
    warnings = [r for r in caplog.records if EXPOSED in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)
    assert all(r.levelno == logging.WARNING for r in warnings)
