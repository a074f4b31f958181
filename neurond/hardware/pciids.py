"""Vendor and device names from the pci.ids database (hwdata on Arch, pci.ids on Debian).

The file is 1.3 MB; it is scanned only for ids not seen yet, and what was found (or not) is
kept until the file changes. Without the file every name is "": names are a courtesy, the
ids are the facts.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

_log = logging.getLogger("neurond.hardware")

DEFAULT_PATHS: tuple[Path, ...] = (
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/misc/pci.ids"),
)
_VENDOR = re.compile(r"([0-9a-f]{4})  (.+)")
_DEVICE = re.compile(r"\t([0-9a-f]{4})  (.+)")
_MAX_CACHED = 4096  # distinct ids on one host are a few dozen; this only bounds a pathology

Names = tuple[str, str]  # (vendor name, device name)


class PciIds:
    """Looks ids up in the first of ``paths`` that exists; safe to use from several threads."""

    def __init__(self, paths: Sequence[Path] = DEFAULT_PATHS) -> None:
        self.paths = tuple(paths)
        self._lock = threading.Lock()
        self._stamp: tuple[str, int, int] | None = None
        self._vendors: dict[str, str] = {}
        self._devices: dict[tuple[str, str], str] = {}

    def names(self, ids: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Names]:
        """(vendor id, device id) → (vendor name, device name), "" where unknown."""
        wanted = set(ids)
        with self._lock:
            path = self._current()
            missing = {i for i in wanted if i not in self._devices}
            if path is not None and missing:
                self._scan(path, missing)
            return {
                (v, d): (self._vendors.get(v, ""), self._devices.get((v, d), "")) for v, d in wanted
            }

    def _current(self) -> Path | None:
        """The database file to use; forgets what was read when it changed or went away."""
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = (str(path), st.st_mtime_ns, st.st_size)
            if stamp != self._stamp or len(self._devices) > _MAX_CACHED:
                self._stamp = stamp
                self._vendors.clear()
                self._devices.clear()
            return path
        self._stamp = None
        self._vendors.clear()
        self._devices.clear()
        return None

    def _scan(self, path: Path, missing: set[tuple[str, str]]) -> None:
        vendors = {v for v, _ in missing}
        vendor: str | None = None  # the vendor whose devices follow, if it is one we want
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("C "):
                        break  # the class list follows the vendors
                    if m := _VENDOR.fullmatch(line.rstrip("\n")):
                        vendor = m[1] if m[1] in vendors else None
                        if vendor is not None:
                            self._vendors[vendor] = m[2].strip()
                    elif vendor is not None and (m := _DEVICE.fullmatch(line.rstrip("\n"))):
                        if (vendor, m[1]) in missing:
                            self._devices[(vendor, m[1])] = m[2].strip()
        except OSError as e:
            _log.warning("Cannot read the PCI id database %s: %s", path, e.strerror)
            return
        for key in missing:
            self._devices.setdefault(key, "")  # known unknown: not scanned for again
