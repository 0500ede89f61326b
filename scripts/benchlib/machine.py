"""Where the figures came from: CPU, kernel, Python, and the versions of what was measured."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from benchlib.procs import ROOT


def _output(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]
    return "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "?"


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def _kqs_tree() -> str:
    """Whether kqs/ differs from the commit (others may be editing it): read-only git."""
    argv = ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "kqs"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        code = subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode
        return {0: "as committed", 1: "with uncommitted changes"}.get(code, "?")
    return "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def describe() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_gb": _mem_total_gb(),
        "kernel": platform.release(),
        "python": _output([str(ROOT / ".venv" / "bin" / "python"), "--version"]),
        "kqs_commit": _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "kqs_tree": _kqs_tree(),
        "beanstalkd": _output(["beanstalkd", "-v"]),
        "redis_server": _output(["redis-server", "--version"]),
        "rq": _version("rq"),
        "redis_py": _version("redis"),
        "greenstalk": _version("greenstalk"),
        "orjson": _version("orjson"),
        "uvloop_in_load_generator": _version("uvloop"),
    }
