"""py-spy profiles of the kqs server under the 64-client and array workloads.

Two py-spy samplers run at once on the server (100 Hz, --nonblocking: the server is never
paused) while the load runs: `cpu` samples only the thread holding the GIL (where Python
CPU time goes: the hot paths), `wall` every thread that is not idle (so waits in fsync
and in the selector show too). The collapsed stacks (`-f raw`) are summarised as self
time (the innermost frame of each sample), inclusive time (every frame of kqs's own code
on the stack) and the share of each thread, as a share of that sampler's samples. With
100 Hz over `profile_seconds`, `cpu` samples / (100 * seconds) is how busy the GIL was.
These runs are separate from the measured ones: sampling costs CPU.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib.insert import SHAPES, journal_rates
from benchlib.loadgen import Load, run_load
from benchlib.procs import ROOT, BenchError, KqsServer
from benchlib.settings import Settings
from benchlib.targets import KqsInsert

PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
TOP = 15


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`, dropping directories and lines."""
    match = FRAME_RE.match(frame)
    if match is None:
        return frame
    path = "/" + match["file"]
    # kqs's own files keep their package path (kqs/journal/journal.py); others the name
    short = "kqs/" + path.rsplit("/kqs/", 1)[1] if "/kqs/" in path else path.rsplit("/", 1)[-1]
    return f"{match['func']} ({short})"


def thread_role(label: str) -> str:
    """Which of the server's threads a sample is from, by py-spy's `thread (id): name`."""
    name = label.partition(": ")[2] or label
    return "event loop (MainThread)" if name == "MainThread" else f"thread {name}"


def summarise(raw: str) -> dict[str, Any]:
    """Top self-time and inclusive-time functions from py-spy's collapsed stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        label, _, rest = stack.partition(";")
        frames = [frame_name(f) for f in rest.split(";")] if rest else []
        if not frames:
            continue
        total += count
        threads[thread_role(label)] += count
        leaf = frames[-1]
        if "(<string>)" in leaf and len(frames) > 1:  # generated code: a dataclass __init__
            leaf = f"{leaf} <- {frames[-2]}"
        self_time[leaf] += count
        for name in set(frames):
            if "(kqs/" in name and "(kqs/cli.py)" not in name:  # cli: the root of everything
                inclusive[name] += count

    def top(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "pct": round(100 * n / total, 1), "samples": n}
            for name, n in counter.most_common(TOP)
        ]

    return {
        "samples": total,
        "threads": top(threads),
        "self": top(self_time),
        "inclusive_kqs": top(inclusive),
    }


def start_spy(pid: int, out: Path, seconds: float, gil: bool) -> subprocess.Popen[bytes]:
    argv = [str(PY_SPY), "record", "-p", str(pid), "-f", "raw", "-o", str(out)]
    argv += ["-d", str(int(seconds)), "-r", "100", "--nonblocking", "--threads"]
    if gil:
        argv.append("--gil")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_spy(spy: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        raise BenchError("py-spy did not finish") from None
    if spy.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    summary = summarise(out.read_text())
    summary["raw_file"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    return summary


def profile_shape(settings: Settings, server: KqsServer, shape_key: str) -> dict[str, Any]:
    """Two samplers at once: GIL holders only (CPU), and every busy thread (wall)."""
    shape = next(s for s in SHAPES if s.key == shape_key)
    seconds = settings.profile_seconds
    outs = {v: settings.out_dir / f"results-profile-{shape_key}-{v}.txt" for v in ("cpu", "wall")}
    spies = {v: start_spy(server.pid, out, seconds, gil=v == "cpu") for v, out in outs.items()}
    load = Load(
        KqsInsert(server.port),
        clients=shape.clients,
        procs=settings.procs,
        batch=shape.batch,
        warmup=0.5,
        duration=seconds + 1.0,
    )
    journal_before = server.stats()["journal"]
    result = run_load(load, [server.pid])
    journal = journal_rates(journal_before, server.stats()["journal"], load.duration or 1.0)
    summary = {v: finish_spy(spy, outs[v]) for v, spy in spies.items()}
    return {
        "shape": shape_key,
        "jobs_per_s_while_profiled": round(result.jobs_per_s, 1),
        "server_cpu_cores": round(result.server_cpu, 2),
        "journal": journal,
        **summary,
    }


def run(settings: Settings, tmp: Path) -> dict[str, Any]:
    server = KqsServer(tmp / "kqs-profile")
    server.start()
    try:
        return {key: profile_shape(settings, server, key) for key in ("c64", "arr100")}
    finally:
        server.stop()
