"""The disk seam: every OS call the journal makes, as methods of one object.

The journal never calls `os` directly; it is handed a `DiskIO` (default `OS_IO`).
Tests subclass it to make `fsync` or `write` raise OSError (EIO, ENOSPC) or to count
calls. Methods may be called from the journal's worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path


class DiskIO:
    """Thin wrappers over `os`; each does exactly the one call it names."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        """Open `path` with `flags` (O_CLOEXEC added); return the file descriptor."""
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """One write(2); returns how many bytes it took (may be fewer than given)."""
        return os.write(fd, data)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        """One pread(2); may return fewer bytes than asked at the end of the file."""
        return os.pread(fd, length, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def size(self, fd: int) -> int:
        """Current size of the open file."""
        return os.fstat(fd).st_size

    def rename(self, src: Path, dst: Path) -> None:
        """Atomically replace `dst` with `src` (same directory)."""
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: Path) -> None:
        """Create `path` and missing parents; an existing directory is fine."""
        os.makedirs(path, exist_ok=True)

    def free_bytes(self, path: Path) -> int:
        """Bytes an unprivileged writer may still use on the file system of `path`."""
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def fsync_dir(self, path: Path) -> None:
        """Make creations, renames and deletions inside directory `path` durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS_IO = DiskIO()
