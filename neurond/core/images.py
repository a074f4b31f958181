"""The files in ``storage.image_dir`` as images: ListImages and DeleteImage.

An image is a regular, non-hidden file directly in the image directory (hidden names are a
download's temporary files; symlinks and directories are not images, so nothing outside the
directory is ever listed or deleted). Its ``sha256`` is known when a download verified it: the
download records it in ``storage.state_dir/images.json`` with the file's size and mtime, and an
entry counts only while both still match (a file replaced by hand has no known checksum). A
missing or unreadable index means no checksum is known; it never fails a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from neurond.core.vm import VM
from neurond.domain import media
from neurond.errors import InvalidArgumentError, InvalidStateError, OperationFailedError

_log = logging.getLogger("neurond.core")

INDEX = "images.json"
NAME_MAX = 255  # bytes, as the kernel counts a path component
_index_lock = threading.Lock()  # one writer at a time (downloads finish in worker threads)
# DeleteImage's check-then-unlink and ChangeMedia's check-then-insert exclude each other: an
# image is never deleted between a VM's new use of it being checked and libvirt recording it.
files_lock = asyncio.Lock()


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    size: int
    sha256: str  # "" when no download verified it
    used_by: tuple[str, ...] = ()  # UUIDs of the VMs whose definitions refer to the file


def _show(value: str, limit: int = 64) -> str:
    """A caller's name quoted for a message: bounded, non-printable characters escaped."""
    shown = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return f"'{shown}" + ("…'" if len(value) > limit else "'")


def check_name(name: str) -> str:
    """A plain file name in the image directory: no '/', no hidden or '..' name, no control
    characters, at most 255 bytes; InvalidArgumentError otherwise."""
    bad = (
        not name
        or "/" in name
        or name.startswith(".")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX
    )
    if bad:
        raise InvalidArgumentError(
            f"{_show(name)} is not an image name: give a file name in the image directory "
            "as ListImages shows it (no '/', not starting with '.').",
            details={"argument": "name"},
        )
    return name


class ChecksumIndex:
    """``state_dir/images.json``: name → sha256, size and mtime of a file a download verified."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / INDEX

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            _log.warning("Ignoring the image checksum index %s: %s", self.path, e)
            return {}
        if not isinstance(data, dict):
            _log.warning("Ignoring the image checksum index %s: not a JSON object", self.path)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    def sha256(self, name: str, st: os.stat_result, entries: dict[str, dict[str, Any]]) -> str:
        entry = entries.get(name, {})
        same = entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
        digest = entry.get("sha256")
        return digest if same and isinstance(digest, str) else ""

    def record(self, name: str, sha256: str, st: os.stat_result) -> None:
        """Remember a verified checksum; a failure to write is logged, never raised (the
        download itself succeeded)."""
        entry = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        with _index_lock:
            data = self.read()
            data[name] = entry
            self._write(data)

    def forget(self, name: str) -> None:
        with _index_lock:
            data = self.read()
            if data.pop(name, None) is not None:  # no entry: the file is not even created
                self._write(data)

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{INDEX}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _log.warning("Could not write the image checksum index %s: %s", self.path, e)


def scan(image_dir: Path, index: ChecksumIndex) -> list[tuple[Image, str]]:
    """(image, real path) for every image in the directory, sorted by name."""
    entries = index.read()
    out = []
    try:
        listing = list(os.scandir(image_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise OperationFailedError(
            f"Cannot read the image directory {image_dir}: {e.strerror}.",
            details={"path": str(image_dir)},
        ) from None
    for entry in listing:
        if entry.name.startswith("."):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        if not stat.S_ISREG(st.st_mode):
            continue
        image = Image(entry.name, st.st_size, index.sha256(entry.name, st, entries))
        out.append((image, os.path.realpath(entry.path)))
    return sorted(out, key=lambda pair: pair[0].name)


def _real_paths(
    files: dict[str, frozenset[str]], creating: dict[str, str]
) -> dict[str, frozenset[str]]:
    """The real paths of the domains' files, and of those of the VMs being created (from the
    XML their create will define)."""
    planned = {uuid: media.files(xml) for uuid, xml in creating.items() if uuid not in files}
    return {
        uuid: frozenset(os.path.realpath(p) for p in paths)
        for uuid, paths in {**planned, **files}.items()
    }


class DomainFiles(Protocol):
    async def domain_files(self) -> dict[str, frozenset[str]]: ...


class Images:
    """ListImages and DeleteImage over the image directory and libvirt's domain definitions."""

    def __init__(
        self, backend: DomainFiles, vms: dict[str, VM], creating: Mapping[str, str]
    ) -> None:
        self.backend = backend
        self.vms = vms  # the registry, for the names of the VMs using an image
        self.creating = creating  # Creator.creating: the domain XML of each create in flight

    async def _users(self) -> dict[str, frozenset[str]]:
        files = await self.backend.domain_files()
        return await asyncio.to_thread(_real_paths, files, dict(self.creating))

    async def list_images(self, image_dir: Path, state_dir: Path) -> list[Image]:
        found = await asyncio.to_thread(scan, image_dir, ChecksumIndex(state_dir))
        users = await self._users()
        return [
            Image(i.name, i.size, i.sha256, tuple(sorted(u for u, p in users.items() if real in p)))
            for i, real in found
        ]

    async def delete_image(
        self, image_dir: Path, state_dir: Path, name: str, downloading: int | None
    ) -> None:
        """Remove an image no VM refers to; ``downloading`` is the number of a download job
        still writing to that name (refused)."""
        name = check_name(name)
        path = image_dir / name
        if downloading is not None:
            raise InvalidStateError(
                f"Image {name!r} is being downloaded by job {downloading}; cancel the job "
                "or wait for it to end.",
                details={"image": name, "job": downloading},
            )
        async with files_lock:
            real = await asyncio.to_thread(self._existing, path, name)
            users = [u for u, paths in (await self._users()).items() if real in paths]
            if users:
                names = sorted(self.vms[u].name if u in self.vms else u for u in users)
                raise InvalidStateError(
                    f"Image {name!r} is in use by VM {', '.join(repr(n) for n in names)}; "
                    "change its media or delete the VM first.",
                    details={"image": name, "vm": ", ".join(names)},
                )
            await asyncio.to_thread(self._remove, path, name, ChecksumIndex(state_dir))
        _log.info("Deleted image %s", path, extra={"fields": {"NEUROND_IMAGE": name}})

    @staticmethod
    def _existing(path: Path, name: str) -> str:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OperationFailedError(
                f"Cannot examine image {name!r}: {e.strerror}.", details={"image": name}
            ) from None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(
                f"There is no image named {name!r} in {path.parent}; ListImages shows the images.",
                details={"argument": "name", "image": name},
            )
        return os.path.realpath(path)

    @staticmethod
    def _remove(path: Path, name: str, index: ChecksumIndex) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # removed meanwhile: the result is the same
        except OSError as e:
            raise OperationFailedError(
                f"Could not delete image {name!r}: {e.strerror}.", details={"image": name}
            ) from None
        index.forget(name)
