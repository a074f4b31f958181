"""Validation of untrusted input: VM names, UUIDs, PCI addresses and typed readers for ``a{sv}``.

The bus layer hands options in as ``{key: (signature, value)}`` (the variant unwrapped), so
this module needs nothing of dbus. Every reader names the bad key and the expected type.
"""

from __future__ import annotations

import re
import uuid as _uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neurond.errors import InvalidArgumentError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# DDDD:BB:SS.F in hexadecimal (domain, bus, slot, function); ASCII only, matched whole.
PCI_ADDRESS_RE = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
PCI_ADDRESS_LENGTH = 12
MAX_STRING = 4096
MAX_OPTIONS = 64

# D-Bus integer signatures and their ranges; any of them may carry an integer key.
_INT_SIGS = {"y", "n", "q", "i", "u", "x", "t"}

TypedOptions = Mapping[str, tuple[str, Any]]


def _show(value: str, limit: int = 64) -> str:
    """A caller's string made safe to quote in a message (bounded, printable)."""
    text = value[:limit].encode("unicode_escape").decode("ascii")
    return text + ("…" if len(value) > limit else "")


def vm_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise InvalidArgumentError(
            f"{_show(value)!r} is not a valid VM name: use 1 to 64 letters, digits, "
            "'_', '.' or '-', "
            "starting with a letter or digit.",
            details={"argument": "name"},
        )
    return value


def is_uuid(value: str) -> bool:
    try:
        return str(_uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


def name_or_uuid(value: str) -> str:
    """A lookup key: a valid VM name or a UUID in canonical form."""
    if len(value) > 64 and not is_uuid(value):
        raise InvalidArgumentError(
            f"{_show(value)!r} is neither a VM name nor a UUID.",
            details={"argument": "name_or_uuid"},
        )
    if is_uuid(value):
        return value.lower()
    if not NAME_RE.match(value):
        raise InvalidArgumentError(
            f"{_show(value)!r} is neither a VM name nor a UUID.",
            details={"argument": "name_or_uuid"},
        )
    return value


def pci_address(value: str, argument: str = "address") -> str:
    """A PCI address ``DDDD:BB:SS.F``, lowercased as sysfs names devices.

    Only a value that passes can become part of a sysfs path: it has no ``/`` and no ``..``.
    """
    if len(value) != PCI_ADDRESS_LENGTH or not PCI_ADDRESS_RE.fullmatch(value):
        raise InvalidArgumentError(
            f"{_show(value)!r} is not a PCI address: write it as DDDD:BB:SS.F in hexadecimal, "
            "e.g. 0000:01:00.0.",
            details={"argument": argument},
        )
    return value.lower()


# A program path in a guest: POSIX (/bin/sh), a Windows drive (C:\ or C:/) or UNC (\\host\share).
_GUEST_ABSOLUTE_RE = re.compile(r"/|[A-Za-z]:[\\/]|\\\\[^\\]")
MAX_GUEST_ARGS = 256


def guest_command(path: str, args: list[str]) -> tuple[str, tuple[str, ...]]:
    """GuestExec's program and arguments: an absolute path, bounded sizes, no NUL."""
    if not _GUEST_ABSOLUTE_RE.match(path) or "\0" in path or len(path) > MAX_STRING:
        raise InvalidArgumentError(
            f"{_show(path)!r} is not an absolute path: give the program's full path in the "
            "guest, e.g. /bin/sh or C:\\Windows\\System32\\cmd.exe.",
            details={"argument": "path"},
        )
    if len(args) > MAX_GUEST_ARGS:
        raise InvalidArgumentError(
            f"Too many arguments: {len(args)} (at most {MAX_GUEST_ARGS}).",
            details={"argument": "args"},
        )
    for i, arg in enumerate(args):
        if len(arg) > MAX_STRING or "\0" in arg:
            raise InvalidArgumentError(
                f"Argument {i} is longer than {MAX_STRING} characters or holds a NUL.",
                details={"argument": "args", "index": i},
            )
    return path, tuple(args)


def file_under_roots(value: str, roots: Sequence[Path], argument: str) -> str:
    """The real path of an existing regular file given as an absolute path without ``..``,
    if it lies under one of ``roots`` once every symlink is resolved (no symlink escape)."""

    def bad(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{argument} {_show(value)!r} {why}.", details={"argument": argument}
        )

    if not value.startswith("/") or "\0" in value or len(value) > MAX_STRING:
        raise bad("is not an absolute path")
    if ".." in value.split("/"):
        raise bad("must not contain '..'")
    try:
        real = Path(value).resolve(strict=True)
    except (OSError, RuntimeError):
        raise bad("does not exist") from None
    for root in roots:
        try:
            real_root = root.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real.is_relative_to(real_root) and real != real_root:
            if not real.is_file():
                raise bad("is not a regular file")
            return str(real)
    shown = ", ".join(str(r) for r in roots) or "(none configured)"
    raise bad(f"is not under an ISO root ({shown})")


class Options:
    """Typed reader for an ``a{sv}`` argument; ``done()`` rejects keys nobody read."""

    def __init__(self, raw: TypedOptions, what: str) -> None:
        if len(raw) > MAX_OPTIONS:
            raise InvalidArgumentError(
                f"Too many options for {what}: {len(raw)} (at most {MAX_OPTIONS}).",
                details={"argument": "options"},
            )
        self._raw = raw
        self._what = what
        self._seen: set[str] = set()

    def _take(self, key: str, expected: str, sigs: set[str]) -> Any:
        self._seen.add(key)
        if key not in self._raw:
            return None
        sig, value = self._raw[key]
        if sig not in sigs:
            raise InvalidArgumentError(
                f"Option {key!r} of {self._what} must be {expected}, not D-Bus type {sig!r}.",
                details={"option": key, "signature": sig},
            )
        return value

    def bool(self, key: str, default: bool = False) -> bool:
        value = self._take(key, "a boolean (b)", {"b"})
        return default if value is None else bool(value)

    def uint(self, key: str, default: int, *, minimum: int = 0, maximum: int = 2**64 - 1) -> int:
        value = self._take(key, "an integer", _INT_SIGS)
        if value is None:
            return default
        if not minimum <= int(value) <= maximum:
            raise InvalidArgumentError(
                f"Option {key!r} of {self._what} must be between {minimum} and {maximum}, "
                f"not {value}.",
                details={"option": key, "value": value},
            )
        return int(value)

    def blob(self, key: str, *, max_length: int) -> bytes:
        """Raw bytes (``ay``), at most ``max_length`` of them; b"" when absent."""
        value = self._take(key, "a byte array (ay)", {"ay"})
        if value is None:
            return b""
        if len(value) > max_length:
            raise InvalidArgumentError(
                f"Option {key!r} of {self._what} is longer than {max_length} bytes.",
                details={"option": key},
            )
        return bytes(value)

    def str(self, key: str, default: str = "", *, max_length: int = MAX_STRING) -> str:
        value = self._take(key, "a string (s)", {"s"})
        if value is None:
            return default
        if len(value) > max_length:
            raise InvalidArgumentError(
                f"Option {key!r} of {self._what} is longer than {max_length} characters.",
                details={"option": key},
            )
        return str(value)

    def done(self) -> None:
        unknown = sorted(set(self._raw) - self._seen)
        if unknown:
            raise InvalidArgumentError(
                f"Unknown option {_show(unknown[0])!r} for {self._what}.",
                details={"option": _show(unknown[0])},
            )
