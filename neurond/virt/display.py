"""GetDisplay: the best working display of a domain, read from its live XML and the host.

Order: Looking Glass (an IVSHMEM ``shmem`` device named ``looking-glass*`` whose file in
/dev/shm exists as a regular file of the device's size, readable and writable by its owner
and group and not writable by everyone) → SPICE → VNC → none. SPICE and VNC need a TCP
listener with a port in the live XML (libvirt writes the port it chose for ``autoport``);
the answer is ``spice://HOST:PORT`` / ``vnc://HOST:PORT`` with the TCP port, never a VNC
display number. A wildcard listen address (0.0.0.0, ::) is answered with the loopback
address, as the client runs on this host. ``fallback_reason`` names every better option the
VM has but cannot use now, and why; for ``none`` it says why there is nothing.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from neurond.core.guest import Display
from neurond.errors import OperationFailedError

SHM_DIR = Path("/dev/shm")
LOOKING_GLASS_PREFIX = "looking-glass"
DEFAULT_LISTEN = "127.0.0.1"  # libvirt's default (qemu.conf spice_listen / vnc_listen)

_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 2**20, "mib": 2**20,
          "g": 2**30, "gib": 2**30, "kb": 1000, "mb": 10**6, "gb": 10**9}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Graphics:
    kind: str  # spice | vnc | anything else libvirt knows (sdl, egl-headless, …)
    host: str  # "" when it has no TCP listener
    port: int  # -1 when libvirt has not assigned one
    why_not: str  # "" when usable


@dataclass(frozen=True, slots=True)
class SharedMemory:
    name: str
    size: int  # bytes; 0 when the XML gives none


def _host(address: str) -> str:
    """A listen address as a URI host: wildcard → loopback, IPv6 in brackets."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a host name
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _graphics(el: ET.Element) -> Graphics:
    kind = el.get("type", "")
    port = int(el.get("port", "-1") or -1)
    listen = el.find("listen")
    if listen is not None and listen.get("type") in ("socket", "none"):
        how = "a UNIX socket" if listen.get("type") == "socket" else "no listener"
        return Graphics(kind, "", port, f"its {kind.upper()} display has {how}, not a TCP port")
    address = (listen.get("address") if listen is not None else None) or el.get("listen")
    if port <= 0:
        return Graphics(kind, "", port, f"its {kind.upper()} display has no TCP port assigned")
    return Graphics(kind, _host(address or DEFAULT_LISTEN), port, "")


def _size(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    return int(el.text or "0") * _UNITS.get(el.get("unit", "M").lower(), 2**20)


def parse(xml: str) -> tuple[list[SharedMemory], list[Graphics]]:
    """The Looking Glass devices and the graphics devices of a live domain XML."""
    try:
        root = ET.fromstring(xml)
        shmems = [
            SharedMemory(s.get("name", ""), _size(s.find("size")))
            for s in root.iterfind("./devices/shmem")
            if s.get("name", "").startswith(LOOKING_GLASS_PREFIX)
        ]
        graphics = [_graphics(g) for g in root.iterfind("./devices/graphics")]
    except (ET.ParseError, ValueError) as e:
        raise OperationFailedError(f"libvirt returned domain XML neurond cannot read: {e}.") from e
    return shmems, graphics


def shm_problem(path: Path, size: int) -> str:
    """Why the Looking Glass file at ``path`` is not usable, or "" when it is."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"its shared memory file {path} does not exist"
    except OSError as e:
        return f"its shared memory file {path} cannot be read ({os.strerror(e.errno or 0)})"
    if not stat.S_ISREG(st.st_mode):
        return f"its shared memory file {path} is not a regular file"
    if size and st.st_size != size:
        return f"its shared memory file {path} has {st.st_size} bytes, not {size}"
    if st.st_mode & 0o660 != 0o660:
        return (
            f"its shared memory file {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
            "its owner and group must be able to read and write it"
        )
    if st.st_mode & 0o002:
        return f"its shared memory file {path} is writable by every user"
    return ""


def choose(xml: str, shm_dir: Path = SHM_DIR) -> Display:
    """The best usable display of the live domain ``xml``."""
    shmems, graphics = parse(xml)
    skipped: list[str] = []
    for shm in shmems:
        if "/" in shm.name or shm.name in ("", ".", ".."):
            skipped.append(f"Looking Glass is not usable: the device name {shm.name!r} is no file")
            continue
        path = shm_dir / shm.name
        problem = shm_problem(path, shm.size)
        if not problem:
            return Display("looking-glass", shm_path=str(path), fallback_reason="; ".join(skipped))
        skipped.append(f"Looking Glass is not usable: {problem}")
    for kind in ("spice", "vnc"):
        for g in graphics:
            if g.kind != kind:
                continue
            if not g.why_not:
                return Display(
                    kind, uri=f"{kind}://{g.host}:{g.port}", fallback_reason="; ".join(skipped)
                )
            skipped.append(f"{kind.upper()} is not usable: {g.why_not}")
    if not shmems and not graphics:
        skipped.append("the VM has no display device (no Looking Glass, SPICE or VNC)")
    elif not skipped:
        kinds = ", ".join(sorted({g.kind for g in graphics}))
        skipped.append(f"the VM has no Looking Glass, SPICE or VNC display (only {kinds})")
    return Display("none", fallback_reason="; ".join(skipped))
