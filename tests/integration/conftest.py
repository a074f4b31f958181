"""Fixtures for the tier on a real libvirtd (qemu:///system) and the tiny real guest.

Session: the guest is built once (scripts/build-guest.sh, cached in GUEST_DIR), /dev/kvm gets
the permissions TESTING.md asks for, virtlogd and libvirtd are started unless they run already
(and stopped at the end only if this session started them), leftover ``nrdtest-*`` domains
are removed. Per test: a factory of uniquely named domains (XML written here with
xml.etree), each destroyed and undefined at teardown, and neurond on a private system bus
talking to qemu:///system (the bus fixtures of tests/bus/conftest.py).

neurond runs as root, so libvirtd needs no system bus of its own here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bus.conftest import ROOT, client, private_bus, start_daemon
from tests.harness import REPO_ROOT, Daemon

__all__ = [
    "client",
    "domains",
    "guest",
    "libvirt_daemons",
    "neurond",
    "private_bus",
    "start_daemon",
]

URI = "qemu:///system"
PREFIX = "nrdtest-"
GUEST_DIR = Path(os.environ.get("NEUROND_GUEST_DIR", "/var/cache/neurond-tests/guest"))
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
READY_LINE = "NRDTEST-READY"

# virsh's words for the states (virsh list / domstate) → neurond's State values
VIRSH_STATES = {
    "running": "running",
    "idle": "running",
    "paused": "paused",
    "in shutdown": "stopping",
    "shut off": "shutoff",
    "crashed": "crashed",
    "pmsuspended": "pmsuspended",
}


def vm_path(uuid: str) -> str:
    return f"{ROOT}/vm/{uuid.replace('-', '_')}"


# -- virsh -----------------------------------------------------------------------------------


def virsh_sync(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    """Run `virsh -c qemu:///system -q ARGS` (blocking); its stdout."""
    out = subprocess.run(
        ["virsh", "-c", URI, "-q", *args],
        capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and out.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out.stdout


def undefine_sync(name: str) -> None:
    """Destroy and undefine a domain, whatever it has (the flags neurond uses: plain undefine
    fails for a UEFI domain); gone already is fine."""
    virsh_sync("destroy", name, check=False)
    flags = ["--managed-save", "--snapshots-metadata", "--checkpoints-metadata", "--nvram", "--tpm"]
    virsh_sync("undefine", *flags, name, check=False)


async def virsh(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    """virsh without blocking the event loop (the test's D-Bus client keeps reading signals)."""
    proc = await asyncio.create_subprocess_exec(
        "virsh", "-c", URI, "-q", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"virsh {' '.join(args)} did not finish in {timeout} s") from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"virsh {' '.join(args)} failed ({proc.returncode}): {stderr.decode(errors='replace')}"
        )
    return stdout.decode(errors="replace")


def virsh_list_all() -> dict[str, str]:
    """name → neurond-style state of every domain, as `virsh list --all` shows them."""
    out: dict[str, str] = {}
    for line in virsh_sync("list", "--all").splitlines():
        # " Id   Name   State" rows: the id is a number or "-"; the state may hold a space.
        m = re.match(r"\s*(\S+)\s+(\S+)\s+(.+?)\s*$", line)
        if m:
            out[m.group(2)] = VIRSH_STATES.get(m.group(3), m.group(3))
    return out


# -- libvirtd and virtlogd -------------------------------------------------------------------


def _pid_alive(pidfile: Path, comm: str) -> int | None:
    """The pid in ``pidfile`` if that process runs (not a zombie) and is ``comm``."""
    try:
        pid = int(pidfile.read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) S ...": the comm may hold spaces or parentheses, the state follows the last ")"
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    state = stat[stat.rindex(")") + 2 :].split()[0]
    return pid if name == comm and state not in ("Z", "X") else None


@dataclass
class LibvirtDaemons:
    """virtlogd + libvirtd as TESTING.md starts them; tests may kill and restart libvirtd."""

    libvirtd_pidfile: Path = Path("/run/libvirtd.pid")
    virtlogd_pidfile: Path = Path("/run/virtlogd.pid")
    started: set[str] = field(default_factory=set)  # what this session started (and stops)

    @staticmethod
    def prepare_kvm() -> None:
        # TESTING.md: without this every define re-probes QEMU (~1 min).
        kvm = Path("/dev/kvm")
        if kvm.exists():
            with contextlib.suppress(KeyError, OSError):
                shutil.chown(kvm, group="kvm")
                kvm.chmod(0o660)

    def libvirtd_pid(self) -> int | None:
        return _pid_alive(self.libvirtd_pidfile, "libvirtd")

    def virtlogd_pid(self) -> int | None:
        return _pid_alive(self.virtlogd_pidfile, "virtlogd")

    def start(self) -> None:
        """Start whichever of virtlogd and libvirtd is not running; wait until libvirtd answers."""
        if self.virtlogd_pid() is None:
            subprocess.run(["virtlogd", "-d"], check=True, timeout=30)
            self.started.add("virtlogd")
        if self.libvirtd_pid() is None:
            subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
            self.started.add("libvirtd")
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(
                ["virsh", "-c", URI, "-q", "uri"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd does not answer at {URI}: {out.stderr}")
            time.sleep(0.05)

    def kill_libvirtd(self) -> None:
        """SIGKILL libvirtd (its guests keep running) and wait until it is gone."""
        pid = self.libvirtd_pid()
        assert pid is not None, "libvirtd is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.libvirtd_pid() is not None:
            assert time.monotonic() < deadline, "libvirtd survived SIGKILL for 10 s"
            time.sleep(0.01)

    def start_libvirtd(self) -> None:
        """Start libvirtd again (stopped at the end only if this session had started it)."""
        subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
        self.wait_ready()

    def stop_started(self) -> None:
        for name, pid in (("libvirtd", self.libvirtd_pid()), ("virtlogd", self.virtlogd_pid())):
            if name in self.started and pid is not None:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while _pid_alive(Path(f"/run/{name}.pid"), name) and time.monotonic() < deadline:
                    time.sleep(0.05)


def remove_leftover_domains() -> None:
    for name in virsh_sync("list", "--all", "--name").split():
        if name.startswith(PREFIX):
            undefine_sync(name)


# -- the guest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd_agent: Path
    initrd_plain: Path
    serial_dir: Path


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """Build (or find cached) the tiny guest; a directory for the serial logs."""
    started = time.monotonic()
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(GUEST_DIR)], capture_output=True, text=True, timeout=1200,
        check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({out.returncode}):\n{out.stderr}")
    print(f"guest ready in {time.monotonic() - started:.1f} s: {out.stderr.strip()}")
    serial_dir = Path(tempfile.mkdtemp(prefix="nrdtest-serial-"))
    serial_dir.chmod(0o755)  # libvirt creates the logs; qemu runs as libvirt-qemu
    yield Guest(
        kernel=GUEST_DIR / "vmlinuz",
        initrd_agent=GUEST_DIR / "initrd-agent.img",
        initrd_plain=GUEST_DIR / "initrd-plain.img",
        serial_dir=serial_dir,
    )
    shutil.rmtree(serial_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_daemons(guest: Guest) -> Iterator[LibvirtDaemons]:
    daemons = LibvirtDaemons()
    daemons.prepare_kvm()
    daemons.start()
    remove_leftover_domains()
    yield daemons
    if daemons.libvirtd_pid() is None:
        daemons.start_libvirtd()
    remove_leftover_domains()
    daemons.stop_started()


# -- domains ---------------------------------------------------------------------------------


@dataclass
class GuestDomain:
    name: str
    uuid: str
    xml: str
    serial_log: Path

    @property
    def path(self) -> str:
        return vm_path(self.uuid)

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait for the guest's ready line (watcher and agent up); the seconds it took."""
        started = time.monotonic()
        while READY_LINE not in self.serial_text():
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{self.name}: no {READY_LINE} within {timeout} s; serial log:\n"
                    + self.serial_text()[-3000:]
                )
            await asyncio.sleep(0.05)
        return time.monotonic() - started


def domain_xml(
    name: str,
    uuid: str,
    guest: Guest,
    serial_log: Path,
    *,
    agent: bool,
    ignore_acpi: bool,
) -> str:
    """A q35 `<domain type='qemu'>` of 256 MiB booting the tiny guest directly, no disk."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="MiB").text = "256"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(guest.kernel)
    ET.SubElement(os_, "initrd").text = str(guest.initrd_agent if agent else guest.initrd_plain)
    cmdline = ["console=ttyS0", "quiet"]
    if ignore_acpi:
        cmdline.append("nrd.acpi=ignore")
    ET.SubElement(os_, "cmdline").text = " ".join(cmdline)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(serial_log), append="off")
    ET.SubElement(serial, "target", port="0")
    if agent:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


MakeDomain = Callable[..., GuestDomain]


@pytest.fixture
def domains(libvirt_daemons: LibvirtDaemons, guest: Guest) -> Iterator[MakeDomain]:
    """``make(agent=False, ignore_acpi=False, define=True)`` → a new uniquely named domain."""
    made: list[GuestDomain] = []

    def make(*, agent: bool = False, ignore_acpi: bool = False, define: bool = True) -> GuestDomain:
        uuid = str(uuidlib.uuid4())
        name = f"{PREFIX}{uuid[:8]}"
        serial_log = guest.serial_dir / f"{name}.log"
        xml = domain_xml(name, uuid, guest, serial_log, agent=agent, ignore_acpi=ignore_acpi)
        dom = GuestDomain(name=name, uuid=uuid, xml=xml, serial_log=serial_log)
        made.append(dom)
        if define:
            define_xml(xml)
        return dom

    yield make
    if libvirt_daemons.libvirtd_pid() is None:  # a test failed while libvirtd was down
        libvirt_daemons.start_libvirtd()
    for dom in made:
        undefine_sync(dom.name)


def define_xml(xml: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix=PREFIX) as f:
        f.write(xml)
        f.flush()
        virsh_sync("define", f.name)


async def define_xml_async(xml: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix=PREFIX) as f:
        f.write(xml)
        f.flush()
        await virsh("define", f.name)


# -- neurond ---------------------------------------------------------------------------------


@pytest.fixture
def neurond(
    libvirt_daemons: LibvirtDaemons, start_daemon: Callable[..., Daemon]
) -> Callable[..., Daemon]:
    """``neurond(**config)`` starts neurond on the private bus with libvirt_uri qemu:///system."""

    def start(**config: Any) -> Daemon:
        return start_daemon(libvirt_uri=URI, config=config or None)

    return start
