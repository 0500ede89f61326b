"""The file store's names, durability steps and failure seam (contract: test_store_contract)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kqs.clock import ManualClock
from kqs.store import MAX_KEY_LENGTH, PayloadMissing, StoreUnavailable
from kqs.store.fs import TMP_PREFIX, FileStore, file_name, key_of

keys = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)], min_size=1, max_size=MAX_KEY_LENGTH)


@given(keys)
def test_file_names_are_safe_and_map_back_to_their_key(key: str) -> None:
    name = file_name(key)
    assert "/" not in name
    assert not name.startswith(".")
    assert len(name.encode()) <= 240
    assert key_of(name) == key


def test_job_ids_are_their_own_file_names() -> None:
    assert file_name("n3f2a9c10-018c5e2a1b3c00001") == "n3f2a9c10-018c5e2a1b3c00001"
    assert file_name("node.a_b-0a") == "node.a_b-0a"
    assert file_name(".x") == "%2Ex"
    assert file_name("..") == "%2E."
    assert file_name("a/b%") == "a%2Fb%25"


@pytest.mark.parametrize("name", [".tmp.abc", ".x", "%2e", "%zz", "a%2", "%41", "", "a b"])
def test_names_that_are_not_key_files(name: str) -> None:
    assert key_of(name) is None  # "%41" is "A", whose own name is "A": not ours


Fsynced = list[tuple[Path, bool]]


def recording_fsync(fsynced: Fsynced, key_file: Path) -> Callable[[int], None]:
    """An fsync that records, in order, what each call synced (the path its fd is open
    on) and whether `key_file` existed then (i.e. whether the rename had happened)."""

    def fsync(fd: int) -> None:
        fsynced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), key_file.exists()))
        os.fsync(fd)

    return fsync


def test_put_fsyncs_new_directories_then_the_file_then_the_directory(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    directory = root / "a" / "b" / "bulk"
    fsynced: Fsynced = []

    async def main() -> None:
        store = FileStore(directory, fsync=recording_fsync(fsynced, directory / "k"))
        await store.put("k", b"data")
        assert await store.get("k") == b"data"

    asyncio.run(main())
    assert os.listdir(directory) == ["k"]
    *parents, (temp, renamed_before), last = fsynced
    # each new directory's parent, top down (its entry made durable) ...
    assert parents == [(root, False), (root / "a", False), (root / "a" / "b", False)]
    # ... then the temp file, before the rename: its bytes are durable before its name ...
    assert temp.parent == directory and temp.name.startswith(TMP_PREFIX)
    assert not renamed_before
    # ... then the directory, after the rename: the name is durable before put returns
    assert last == (directory, True)


def test_put_of_an_existing_key_fsyncs_the_directory(tmp_path: Path) -> None:
    """A put that finds the key's file (e.g. renamed by a put that crashed before its
    directory fsync, and the job fed again) makes the name durable before returning."""
    directory = tmp_path.resolve() / "bulk"
    directory.mkdir()
    (directory / "k").write_bytes(b"renamed, directory not fsynced")
    fsynced: Fsynced = []

    async def main() -> None:
        await FileStore(directory, fsync=recording_fsync(fsynced, directory / "k")).put("k", b"x")

    asyncio.run(main())
    assert fsynced == [(directory, True)]
    assert os.listdir(directory) == ["k"]
    assert (directory / "k").read_bytes() == b"renamed, directory not fsynced"


def test_stored_time_is_the_clock_time_as_mtime(tmp_path: Path) -> None:
    clock = ManualClock(start=1_600_000_000.5)

    async def main() -> None:
        await FileStore(tmp_path, clock=clock).put("k", b"x")

    asyncio.run(main())
    assert (tmp_path / "k").stat().st_mtime == pytest.approx(1_600_000_000.5)


def test_a_failing_fsync_fails_the_put_and_leaves_nothing(tmp_path: Path) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        store = FileStore(tmp_path, fsync=fsync)
        with pytest.raises(StoreUnavailable, match="Input/output error"):
            await store.put("k", b"x")
        with pytest.raises(PayloadMissing):
            await store.get("k")

    (tmp_path / "placeholder").mkdir()  # the directory exists: only the file fsync fails
    asyncio.run(main())
    assert os.listdir(tmp_path) == ["placeholder"]


def test_an_unwritable_directory_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")

    async def main() -> None:
        store = FileStore(tmp_path / "file" / "bulk")  # a file where a directory should be
        with pytest.raises(StoreUnavailable):
            await store.put("k", b"x")
        with pytest.raises(StoreUnavailable):
            await store.get("k")  # ENOTDIR is not "missing": the store is broken

    asyncio.run(main())


def test_list_on_a_missing_directory_is_empty(tmp_path: Path) -> None:
    async def main() -> None:
        store = FileStore(tmp_path / "never")
        assert await store.list_older_than(0, now=time.time() + 60) == []
        await store.delete("k")
        with pytest.raises(PayloadMissing):
            await store.get("k")

    asyncio.run(main())


def test_list_sweeps_old_temp_files_and_ignores_foreign_entries(tmp_path: Path) -> None:
    old = time.time() - 7200
    stale = tmp_path / f"{TMP_PREFIX}deadbeef"
    stale.write_bytes(b"half")
    os.utime(stale, (old, old))
    fresh = tmp_path / f"{TMP_PREFIX}inflight"
    fresh.write_bytes(b"being written")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "README.txt ").write_text("not a key file")  # space: not an escaped name
    (tmp_path / "%41").write_bytes(b"")  # not canonical

    async def main() -> None:
        store = FileStore(tmp_path)
        await store.put("k", b"x")
        assert await store.list_older_than(3600, now=time.time()) == []
        assert await store.list_older_than(0, now=time.time() + 1) == ["k"]

    asyncio.run(main())
    assert not stale.exists()
    assert not fresh.exists()  # older than the last cutoff (now + 1)


def test_put_of_an_existing_key_does_not_rewrite_the_file(tmp_path: Path) -> None:
    async def main() -> None:
        store = FileStore(tmp_path)
        await store.put("k", b"first")
        inode = (tmp_path / "k").stat().st_ino
        await store.put("k", b"second")
        assert (tmp_path / "k").stat().st_ino == inode
        assert await store.get("k") == b"first"

    asyncio.run(main())
