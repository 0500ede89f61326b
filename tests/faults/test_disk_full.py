"""Fault 4: the disk fills up. The server's data directory is a small tmpfs mounted in a
mount namespace of its own (`unshare -m`, held open by a `sleep` so that the tmpfs and
its files outlive a server restart; the server runs in it through `nsenter`). The test
fills the tmpfs from outside (through /proc/<holder>/root), leaving 0 to a few KiB.

First test: while clients insert, the disk fills; every client is told so clearly
(`disk_full`, or `journal_failed`), nothing acknowledged is lost or half-written (a
restart in the same namespace finds every acknowledged job, with at most an
unacknowledged torn tail cut, and nothing quarantined). What kqs does with a finish on
the full disk and with an insert right after space returns goes into the figures' notes.

Second test, as the issue asks: finishing jobs still works while the disk is full, and
inserts are accepted again once space returns, without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kqs.client import Client, RemoteError
from tests.faults.support import Figures, LoadGen, log_lines, sample
from tests.integration.helpers import beanstalk_contents, beanstalkd_address, wait_fed
from tests.support import BeanstalkdProcess, KqsProcess, wait_until

#: Error codes that say "the disk is full" clearly enough.
DISK_FULL_CODES = frozenset({"journal_failed", "disk_full"})
SIZE = "8m"


class TmpfsNamespace:
    """A private mount namespace, held by a `sleep`, in which `mountpoint` is a tmpfs."""

    def __init__(self, mountpoint: Path, size: str) -> None:
        for tool in ("unshare", "nsenter"):
            if shutil.which(tool) is None:
                pytest.skip(f"!!! {tool} (util-linux) missing: the disk-full test did NOT run !!!")
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        script = f'mount -t tmpfs -o size={size} kqs-full "$0" && exec sleep 900'
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(mountpoint)],
            stderr=subprocess.PIPE,
        )

        def mounted() -> bool:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.close()
                pytest.skip(
                    "!!! cannot mount a tmpfs in a private mount namespace here (not root?):"
                    f" the disk-full test did NOT run: {err[-300:]} !!!"
                )
            mounts = Path(f"/proc/{self.proc.pid}/mounts").read_text()
            return f" {mountpoint} tmpfs " in mounts

        wait_until(mounted, timeout=10, what="tmpfs mounted")

    @property
    def inside(self) -> Path:
        """The mountpoint as seen from the namespace (through the holder's root)."""
        return Path(f"/proc/{self.proc.pid}/root{self.mountpoint}")

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-m", "--"]

    def fill(self, leave: int) -> None:
        """Fill the tmpfs with a file, then give back `leave` bytes of it."""
        filler = self.inside / "filler"
        chunk = b"\0" * 2**18
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(10_000):  # bounded: 2.5 GiB at most
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)
        os.truncate(filler, max(0, filler.stat().st_size - leave))

    def free(self) -> None:
        """Space returns."""
        (self.inside / "filler").unlink()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[TmpfsNamespace]:
    ns = TmpfsNamespace(tmp_path / "data", SIZE)
    try:
        yield ns
    finally:
        ns.close()


def padded(client: int, seq: int) -> dict[str, object]:
    return {"type": "fault", "data": {"c": client, "s": seq, "pad": "x" * 2000}}


def try_call(port: int, method: str, params: object) -> str:
    """'ok', or the error code."""
    try:
        with Client("127.0.0.1", port, timeout=10) as c:
            c.call(method, params)
        return "ok"
    except RemoteError as exc:
        return exc.code


def test_disk_full_inserts_fail_clearly_and_nothing_acked_is_lost(
    figures: Figures, tmp_path: Path, beanstalkd: BeanstalkdProcess, full_disk: TmpfsNamespace
) -> None:
    leave = random.choice([0, 700, 3000, 20_000])
    figures.scenario = "disk full (tmpfs)"
    figures.injected = f"{SIZE} tmpfs data_dir filled up to {leave} bytes free; 8 clients"
    server = KqsProcess(
        tmp_path / "data",
        prefix=full_disk.prefix(),
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
    )
    gen = LoadGen(server.port, clients=8, job=padded, stop_on=DISK_FULL_CODES)
    try:
        server.start()
        with Client("127.0.0.1", server.port) as c:
            before = [c.insert("fault", {"before": i}) for i in range(50)]
        with gen:
            wait_until(lambda: gen.count() >= 300, timeout=30, what="inserts before full")
            full_disk.fill(leave)  # while the clients insert
            wait_until(
                lambda: sum(gen.error_count(code) for code in DISK_FULL_CODES) == 8,
                timeout=60,
                what="every client told the disk is full",
            )
        assert not gen.violations, gen.violations[:3]
        assert set(gen.errors) <= DISK_FULL_CODES, gen.errors
        acked = before + gen.snapshot()
        # what happens today to a finish on a full disk, and to inserts once space returns
        finish = try_call(server.port, "finish", {"id": before[0], "outcome": "done"})
        full_disk.free()
        freed = time.monotonic()
        later = try_call(server.port, "insert", {"type": "fault", "data": "space is back"})
        with contextlib.suppress(TimeoutError):  # recorded, not required (see the next test)
            wait_until(
                lambda: try_call(server.port, "insert", {"type": "fault"}) == "ok", timeout=15
            )
        resumed = time.monotonic() - freed
        figures.note(
            f"while full: finish -> {finish}; right after space returned: insert -> {later};"
            f" inserts ok again {resumed:.1f} s after"
        )
        why = log_lines(server, "ERROR", "journal")
        assert why, "no ERROR log line says why the journal refused the inserts"
        figures.note("server log: " + why[0].rsplit("/journal: ", 1)[-1][:150])

        server.kill()  # the tmpfs and its files stay: the namespace is held by its sleep
        server.start()
        wait_fed(server.port, timeout=60)
        present = set(beanstalk_contents(*beanstalkd_address(server.port)))
        expected = set(acked) - ({before[0]} if finish == "ok" else set())
        lost = expected - present
        figures.acknowledged, figures.lost = len(acked), len(lost)
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged jobs lost: {sample(lost)}"
        assert not (full_disk.inside / "journal" / "quarantine").exists()
        assert not log_lines(server, "ERROR", "quarantine")
        assert try_call(server.port, "insert", {"type": "fault", "data": "restarted"}) == "ok"
    finally:
        gen.stop()
        server.kill()


def test_disk_full_finishing_still_works_and_inserts_resume_when_space_returns(
    figures: Figures, tmp_path: Path, beanstalkd: BeanstalkdProcess, full_disk: TmpfsNamespace
) -> None:
    figures.scenario = "disk full: finish works, inserts resume"
    figures.injected = f"{SIZE} tmpfs data_dir filled to 0 bytes free, then freed"
    server = KqsProcess(
        tmp_path / "data",
        prefix=full_disk.prefix(),
        beanstalkd=f"{beanstalkd.host}:{beanstalkd.port}",
    )
    try:
        server.start()
        with Client("127.0.0.1", server.port) as c:
            before = [c.insert("fault", {"before": i}) for i in range(20)]
        figures.acknowledged = len(before)
        full_disk.fill(0)
        codes = [try_call(server.port, "insert", padded(0, n)) for n in range(200)]
        refused = [c for c in codes if c != "ok"]  # the last allocated page may still take some
        assert refused and set(refused) <= DISK_FULL_CODES, codes
        for job_id in before[:10]:  # runners can still report finished jobs
            assert try_call(server.port, "finish", {"id": job_id, "outcome": "done"}) == "ok"
        full_disk.free()
        wait_until(
            lambda: try_call(server.port, "insert", padded(0, 1)) == "ok",
            timeout=15,
            what="inserts accepted again once space returned",
        )
    finally:
        server.kill()
