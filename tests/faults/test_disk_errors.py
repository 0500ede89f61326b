"""Fault 3: the journal's fsync or write fails (EIO, or ENOSPC for a write, injected with
strace into the running server's journal segment), while 16 clients insert.

- No false ack: every acknowledged id survives a restart (strace gone). With `write`
  failing, the failed batch never reaches the file, so a false ack would be a lost job.
  With `fsync` failing, the data does reach the page cache (only the fsync is skipped),
  so the test also reads strace's log: the bytes written after the last fsync that
  succeeded must hold no acknowledged job.
- Every client's insert after the failure is answered `journal_failed`, and so are later
  inserts and finishes (the journal accepts no writes until restarted); the log says why.
  A write failing with ENOSPC may instead be answered `disk_full` (a full disk, which
  kqs may get over by itself once writes succeed again; tests/faults/test_disk_full.py
  tests that with a real full disk).
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kqs.client import Client, RemoteError
from kqs.journal.record import Kind, Record, scan
from tests.faults.support import Figures, LoadGen, log_lines, sample
from tests.integration.helpers import beanstalk_contents, beanstalkd_address, kqs_stats, wait_fed
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

CLIENTS = 16
SYSCALL = re.compile(r"(?:(write|fsync)\(|<\.\.\. (write|fsync) resumed>).*\)\s+=\s+(-?\d+)")


def traced(pid: int) -> bool:
    """True once every thread of `pid` has a tracer."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        status = (task / "status").read_text()
        tracer = re.search(r"^TracerPid:\s+(\d+)", status, re.M)
        if tracer is None or tracer.group(1) == "0":
            return False
    return bool(tasks)


class Strace:
    """strace attached to every thread of a process, injecting an error into `syscall`
    on `path` from its `when`-th call on (counting only calls on that path)."""

    def __init__(self, pid: int, path: Path, syscall: str, error: str, when: int, log: Path):
        binary = shutil.which("strace")
        if binary is None:
            pytest.skip(
                "!!! strace is not installed (apt-get install strace): the fsync/write"
                " fault test did NOT run !!!"
            )
        self.log = log
        self.stderr = log.with_suffix(".stderr")
        args = [binary, "-f", "-p", str(pid), "-o", str(log), "-e", "trace=write,fsync"]
        args += ["-e", f"inject={syscall}:error={error}:when={when}+", "-P", str(path)]
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)

        def attached() -> bool:
            if self.proc.poll() is not None:
                pytest.skip(
                    "!!! strace could not attach in this sandbox (ptrace refused?): the"
                    f" fsync/write fault test did NOT run: {self.stderr.read_text()[-500:]} !!!"
                )
            return traced(pid)

        wait_until(attached, timeout=10, what="strace attached")

    def detach(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def calls(self) -> list[tuple[str, int]]:
        """(syscall, result) of every traced call on the path, in order."""
        out: list[tuple[str, int]] = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = SYSCALL.search(line)
            if m is not None:
                out.append((m.group(1) or m.group(2), int(m.group(3))))
        return out


def covered_end(calls: list[tuple[str, int]], final_size: int) -> int:
    """Bytes of the file made durable by a successful fsync: the final size less what was
    written after the last fsync that succeeded."""
    after_ok = 0
    for name, result in calls:
        if name == "fsync" and result == 0:
            after_ok = 0
        elif name == "write" and result > 0:
            after_ok += result
    return final_size - after_ok


#: What clients must be told: EIO is fatal (the journal accepts no writes until restarted);
#: ENOSPC may instead be reported as a full disk, from which kqs may recover by itself.
EXPECTED = {
    "EIO": frozenset({"journal_failed"}),
    "ENOSPC": frozenset({"journal_failed", "disk_full"}),
}


@pytest.mark.parametrize(
    ("syscall", "error"), [("fsync", "EIO"), ("write", "EIO"), ("write", "ENOSPC")]
)
def test_failed_fsync_or_write_never_acks_and_fails_later_writes(
    tmp_path: Path, beanstalkd: BeanstalkdProcess, figures: Figures, syscall: str, error: str
) -> None:
    when = random.randint(2, 8)
    codes = EXPECTED[error]
    figures.scenario = f"journal {syscall} fails ({error})"
    figures.injected = f"strace: {syscall} of the journal segment -> {error} from its call {when}"
    figures.injected += f" after attach on; {CLIENTS} clients inserting"
    server = KqsProcess(tmp_path / "data", beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}")
    segment = tmp_path / "data" / "journal" / "00000001.seg"
    gen = LoadGen(server.port, clients=CLIENTS, stop_on=codes)
    strace: Strace | None = None
    try:
        server.start()
        with gen:
            wait_until(gen.reached(500), timeout=30, what="inserts before the fault")
            assert server.proc is not None
            strace = Strace(server.proc.pid, segment, syscall, error, when, tmp_path / "strace")
            wait_until(
                lambda: sum(gen.error_count(code) for code in codes) == CLIENTS,
                timeout=60,
                what=f"every client answered {' or '.join(sorted(codes))}",
            )
        acked = gen.snapshot()
        assert not gen.violations, gen.violations[:3]
        assert set(gen.errors) <= codes, gen.errors
        with Client("127.0.0.1", server.port) as c:  # later writes: refused too
            with pytest.raises(RemoteError) as insert_error:
                c.insert("fault", "after")
            assert insert_error.value.code in codes
            if error == "EIO":  # fatal: finishes are refused too, until a restart
                with pytest.raises(RemoteError) as finish_error:
                    c.call("finish", {"id": acked[0], "outcome": "done"})
                assert finish_error.value.code == "journal_failed"
                assert kqs_stats(server.port)["journal"]["failed"] is True
        why = f"journal {syscall} failed" if error == "EIO" else "journal"
        assert log_lines(server, "ERROR", why), "no ERROR log line says why"
        strace.detach()
        if error == "ENOSPC":
            later = "ok"
            try:
                with Client("127.0.0.1", server.port) as c:
                    c.insert("fault", "strace gone")
            except RemoteError as exc:
                later = exc.code
            figures.note(f"insert right after strace detached -> {later}")
        server.kill()

        calls = strace.calls()
        injected = [r for n, r in calls if n == syscall and r < 0]
        assert injected, f"nothing was injected: {calls[-5:]}"
        figures.note(f"{len(injected)} {syscall} call(s) failed")
        if syscall == "fsync":  # the data is in the page cache: loss cannot show a false ack
            buf = segment.read_bytes()
            durable = covered_end(calls, len(buf))
            records = [r for r in scan(buf) if isinstance(r, Record) and r.kind is Kind.INSERT]
            undurable = {r.job_id for r in records if r.offset + r.size > durable}
            false_acks = undurable & set(acked)
            figures.note(
                f"{len(undurable)} jobs written but never covered by a good fsync;"
                f" {len(false_acks)} of them acked (must be 0)"
            )
            assert not false_acks, f"acknowledged without a good fsync: {sample(false_acks)}"

        server.start()  # no strace now
        wait_fed(server.port, timeout=60)
        present = set(beanstalk_contents(*beanstalkd_address(server.port)))
        lost = set(acked) - present
        figures.acknowledged, figures.lost = len(acked), len(lost)
        figures.note(f"{len(present - set(acked))} unacknowledged jobs exist (false negatives)")
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged jobs lost: {sample(lost)}"
        with Client("127.0.0.1", server.port) as c:  # the restarted server takes writes
            c.insert("fault", "after restart")
    finally:
        gen.stop()
        if strace is not None:
            strace.detach()
        server.kill()
