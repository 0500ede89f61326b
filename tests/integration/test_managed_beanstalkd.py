"""kqs.beanstalkd_proc.ManagedBeanstalkd: the embedded, supervised beanstalkd child."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from kqs.beanstalk import BeanstalkClient
from kqs.beanstalkd_proc import BeanstalkdStartError, ManagedBeanstalkd, wait_ready
from kqs.clock import ManualClock
from kqs.errors import BeanstalkdMissing
from tests.support import beanstalkd_binary, free_port, port_open


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _poll(predicate: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        pause = 0.005
        while not predicate():
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)


def test_start_gives_a_working_server(tmp_path: Path) -> None:
    binlog = tmp_path / "data" / "beanstalkd"

    async def main() -> None:
        managed = ManagedBeanstalkd(binary=beanstalkd_binary(), binlog_dir=binlog, max_job_size=100)
        try:
            host, port = await managed.start()
            assert (host, port) == managed.address
            assert host == "127.0.0.1"
            assert port > 0
            assert managed.running
            assert managed.pid is not None
            assert managed.restarts == 0
            client = await BeanstalkClient.connect(host, port)
            try:
                stats = await client.stats()
                assert stats["pid"] == managed.pid
                assert stats["max-job-size"] == 100
                assert (await client.put(b"x" * 100, prio=1, delay=0, ttr=5)).inserted
                assert (
                    await client.put(b"x" * 101, prio=1, delay=0, ttr=5)
                ).status == "JOB_TOO_BIG"
            finally:
                await client.close()
            assert any(p.name.startswith("binlog.") for p in binlog.iterdir())
            pid = managed.pid
        finally:
            await managed.stop()
        assert not managed.running
        assert _gone(pid)
        assert not port_open(host, port)

    asyncio.run(main())


def test_fixed_port_is_used(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        managed = ManagedBeanstalkd(binary=beanstalkd_binary(), binlog_dir=tmp_path, port=port)
        try:
            assert await managed.start() == ("127.0.0.1", port)
        finally:
            await managed.stop()

    asyncio.run(main())


def test_killed_child_is_restarted_on_the_same_port(tmp_path: Path) -> None:
    async def main() -> None:
        clock = ManualClock()  # restart backoff sleeps on it, so restarts come at once
        managed = ManagedBeanstalkd(binary=beanstalkd_binary(), binlog_dir=tmp_path, clock=clock)
        try:
            host, port = await managed.start()
            client = await BeanstalkClient.connect(host, port)
            put = await client.put(b"survives in the binlog", prio=1, delay=0, ttr=5)
            await client.close()
            assert put.id is not None

            for n in (1, 2):
                old = managed.pid
                assert old is not None
                os.kill(old, signal.SIGKILL)
                await _poll(lambda n=n: managed.restarts == n)  # type: ignore[misc]
                assert managed.running
                assert managed.pid not in (None, old)
                assert _gone(old)
                assert managed.address == (host, port)
                await wait_ready(host, port, 5)
                client = await BeanstalkClient.connect(host, port)
                try:
                    assert (await client.stats())["pid"] == managed.pid
                    # Same binlog directory: the job was replayed.
                    assert await client.peek(put.id) == b"survives in the binlog"
                finally:
                    await client.close()
            assert clock.slept == [0.1, 0.2]  # exponential backoff
            pid = managed.pid
        finally:
            await managed.stop()
        assert pid is not None
        assert _gone(pid)
        assert not managed.running

    asyncio.run(main())


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    async def main() -> None:
        managed = ManagedBeanstalkd(binary=beanstalkd_binary(), binlog_dir=tmp_path)
        host, port = await managed.start()
        pid = managed.pid
        assert pid is not None
        assert not _gone(pid)
        await managed.stop()
        assert _gone(pid)
        assert not managed.running
        assert not port_open(host, port)
        await managed.stop()  # twice is harmless
        # No restart happens after stop.
        await asyncio.sleep(0.3)
        assert managed.restarts == 0
        assert not port_open(host, port)

    asyncio.run(main())


def test_stop_before_start_is_harmless(tmp_path: Path) -> None:
    async def main() -> None:
        await ManagedBeanstalkd(binlog_dir=tmp_path).stop()

    asyncio.run(main())


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    async def main() -> None:
        managed = ManagedBeanstalkd(binary="no-such-beanstalkd-binary", binlog_dir=tmp_path / "b")
        with pytest.raises(BeanstalkdMissing) as info:
            await managed.start()
        message = str(info.value)
        assert "apt-get install beanstalkd" in message
        assert 'beanstalkd = "host:port"' in message
        assert not managed.running
        assert not (tmp_path / "b").exists()

    asyncio.run(main())


def test_child_exiting_during_startup_is_an_error(tmp_path: Path) -> None:
    false = shutil.which("false")
    assert false is not None

    async def main() -> None:
        managed = ManagedBeanstalkd(binary=false, binlog_dir=tmp_path)
        with pytest.raises(BeanstalkdStartError, match="exited with code 1"):
            await managed.start()
        assert not managed.running
        await managed.stop()

    asyncio.run(main())


def test_wait_ready_times_out() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await wait_ready("127.0.0.1", free_port(), 0.3)
        assert loop.time() - start < 2

    asyncio.run(main())


def test_a_leftover_child_from_an_earlier_kqs_is_stopped_first(tmp_path: Path) -> None:
    binlog = tmp_path / "data" / "beanstalkd"

    async def main() -> None:
        first = ManagedBeanstalkd(binary=beanstalkd_binary(), binlog_dir=binlog)
        await first.start()
        old_pid = first.pid
        assert old_pid is not None
        # An earlier kqs that vanished: its child still holds the binlog lock.
        second = ManagedBeanstalkd(binary=beanstalkd_binary(), binlog_dir=binlog)
        try:
            await second.start()
            assert second.pid != old_pid
            await _poll(lambda: _gone(old_pid) or first.running is False)
            client = await BeanstalkClient.connect(*second.address)
            try:
                assert (await client.put(b"x", prio=1, delay=0, ttr=5)).inserted
            finally:
                await client.close()
        finally:
            await second.stop()
            await first.stop()

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv missing")
def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from kqs.beanstalkd_proc import ManagedBeanstalkd\n"
        "async def main():\n"
        "    m = ManagedBeanstalkd(binlog_dir=Path(sys.argv[1]))\n"
        "    await m.start()\n"
        "    print(m.pid, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "b")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()
        parent.wait()
        asyncio.run(_poll(lambda: _gone(child) or _zombie(child)))
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
