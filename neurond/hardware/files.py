"""Careful reads of sysfs and procfs files: bounded, non-blocking, never raising.

sysfs attributes are small regular files; anything else where one is expected (a directory,
a FIFO, a symlink loop, a file that fails with EIO) counts as unreadable, so a hostile or
broken tree can neither hang nor crash the daemon.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ATTR_LIMIT = 4096  # a sysfs attribute is at most one page


def read_text(path: Path, limit: int = ATTR_LIMIT) -> str | None:
    """At most ``limit`` bytes of the regular file at ``path``, decoded; None if unreadable.

    The last component is not followed if it is a symlink (no sysfs attribute is one), and a
    FIFO opens without waiting for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            # procfs hands out a record at a time: read until EOF or the limit.
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


def exists(path: Path) -> bool:
    """Whether anything (even a dangling symlink) is at ``path``."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def list_dir(path: Path) -> list[str]:
    """The sorted entry names of a directory; [] when it is missing or unreadable."""
    try:
        return sorted(os.listdir(path))
    except (OSError, ValueError):
        return []


def link_name(path: Path) -> str | None:
    """The last component of the symlink at ``path`` (which need not resolve); None if none."""
    try:
        target = os.readlink(path)
    except (OSError, ValueError):
        return None
    name = target.rstrip("/").rsplit("/", 1)[-1]
    # Undecodable bytes come back as surrogates, which no D-Bus string may carry.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") or None
