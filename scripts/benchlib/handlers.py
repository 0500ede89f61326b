"""The trivial end-to-end jobs: record `<sent> <done>` (wall-clock seconds) and return.

Imported by the processes that run jobs, not by the harness: `kqs run` (in .venv, through
`benchlib.handlers:kqs_record`), the RQ worker (`benchlib.handlers.rq_record`) and the
greenstalk loop. Standard library only. Each completion is one O_APPEND write of a short
line to $BENCH_DONE_FILE, so several worker processes can share the file; the sent time
is the `t` the load generator stamped into the job's data (0 when it did not).
"""

from __future__ import annotations

import os
import time
from typing import Any

_fd: int | None = None


def _record(data: Any) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    sent = data.get("t", 0.0) if isinstance(data, dict) else 0.0
    os.write(_fd, b"%.6f %.6f\n" % (sent, time.time()))


async def kqs_record(job: Any) -> None:
    """kqs runner handler (async: runs on the runner's event loop, no thread hop)."""
    _record(job.data)


def rq_record(data: Any) -> None:
    """RQ job function."""
    _record(data)


def record(data: Any) -> None:
    """For the greenstalk reserve+delete loop."""
    _record(data)
