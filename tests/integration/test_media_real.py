"""Issue 12's media and images on a real libvirtd with the tiny guest: ChangeMedia/EjectMedia on
a running and a shut-off VM, read back from libvirt's live and persistent XML; ListImages and
DeleteImage with an image in use refused.

The tiny guest has no CD-ROM: each test defines it with a SATA CD-ROM added to its XML (q35 has
the SATA controller built in). Run only under the shared lock:
    flock /tmp/neurond-libvirtd.lock .venv/bin/python -m pytest -q \
        tests/integration/test_media_real.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, VM, CallFailed, Client
from tests.harness import Daemon
from tests.integration.conftest import GuestDomain, MakeDomain, define_xml, virsh

StartNeurond = Callable[..., Daemon]
ISO_A, ISO_B = "install.iso", "drivers.iso"


@pytest.fixture
def isos() -> Iterator[Path]:
    """A directory QEMU (user libvirt-qemu) can reach, with two 1 MiB "ISOs"."""
    directory = Path(tempfile.mkdtemp(prefix="nrdtest-iso-"))
    directory.chmod(0o755)
    for name in (ISO_A, ISO_B):
        (directory / name).write_bytes(b"\0" * (1 << 20))
        (directory / name).chmod(0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def with_cdrom(dom: GuestDomain, iso: Path) -> GuestDomain:
    """Define the guest with a SATA CD-ROM holding ``iso``."""
    root = ET.fromstring(dom.xml)
    devices = root.find("devices")
    assert devices is not None
    disk = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=str(iso))
    ET.SubElement(disk, "target", dev="sda", bus="sata")
    ET.SubElement(disk, "readonly")
    dom.xml = ET.tostring(root, encoding="unicode")
    define_xml(dom.xml)
    return dom


async def media(uuid: str, inactive: bool) -> str:
    """The file in the domain's CD-ROM as libvirt has it ("" when empty)."""
    xml = await virsh("dumpxml", *(["--inactive"] if inactive else []), uuid)
    cdrom = ET.fromstring(xml).find("./devices/disk[@device='cdrom']")
    assert cdrom is not None, xml
    source = cdrom.find("source")
    return "" if source is None else source.get("file", "")


async def both(uuid: str) -> tuple[str, str]:
    """(live, persistent) media."""
    return await media(uuid, inactive=False), await media(uuid, inactive=True)


def start(neurond: StartNeurond, isos: Path) -> Daemon:
    storage: dict[str, Any] = {"image_dir": str(isos), "iso_roots": [str(isos)]}
    return neurond(storage=storage)


def cdrom_vm(neurond: StartNeurond, domains: MakeDomain, isos: Path) -> GuestDomain:
    """The guest with ``ISO_A`` in its CD-ROM, and neurond started (``isos``: its images)."""
    dom = with_cdrom(domains(define=False), isos / ISO_A)
    start(neurond, isos)
    return dom


async def test_media_of_a_shut_off_vm_change_persistently(
    neurond: StartNeurond, client: Client, domains: MakeDomain, isos: Path
) -> None:
    dom = cdrom_vm(neurond, domains, isos)
    started = time.monotonic()
    await client.call(dom.path, VM, "ChangeMedia", "s", [str(isos / ISO_B)])
    print(f"ChangeMedia, shut off: {time.monotonic() - started:.3f} s")  # measured, not asserted
    assert await media(dom.uuid, inactive=True) == str(isos / ISO_B)
    assert await client.get(dom.path, VM, "Media") == str(isos / ISO_B)
    await client.call(dom.path, VM, "EjectMedia")
    assert await media(dom.uuid, inactive=True) == ""
    assert await client.get(dom.path, VM, "Media") == ""
    await client.call(dom.path, VM, "ChangeMedia", "s", [str(isos / ISO_A)])
    assert await media(dom.uuid, inactive=True) == str(isos / ISO_A)
    assert await client.get(dom.path, VM, "State") == "shutoff"
    # the changed definition boots: the guest starts with the medium in its drive
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    assert await both(dom.uuid) == (str(isos / ISO_A), str(isos / ISO_A))


async def test_media_of_a_running_and_a_paused_vm_change_live_and_persistently(
    neurond: StartNeurond, client: Client, domains: MakeDomain, isos: Path
) -> None:
    dom = cdrom_vm(neurond, domains, isos)
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    await dom.wait_ready()
    started = time.monotonic()
    await client.call(dom.path, VM, "ChangeMedia", "s", [str(isos / ISO_B)])
    print(f"ChangeMedia, running: {time.monotonic() - started:.3f} s")  # measured, not asserted
    assert await both(dom.uuid) == (str(isos / ISO_B), str(isos / ISO_B))
    assert await client.get(dom.path, VM, "Media") == str(isos / ISO_B)
    await client.call(dom.path, VM, "EjectMedia")
    assert await both(dom.uuid) == ("", "")
    assert await client.get(dom.path, VM, "Media") == ""
    await client.call(dom.path, VM, "Pause")
    await client.call(dom.path, VM, "ChangeMedia", "s", [str(isos / ISO_A)])
    assert await both(dom.uuid) == (str(isos / ISO_A), str(isos / ISO_A))
    await client.call(dom.path, VM, "Resume")
    assert await client.get(dom.path, VM, "State") == "running"
    # QEMU has the medium too, not only libvirt's XML
    out = await virsh("qemu-monitor-command", dom.uuid, "--hmp", "info block")
    assert str(isos / ISO_A) in out, out


async def test_a_running_vm_without_cdrom_is_not_supported(
    neurond: StartNeurond, client: Client, domains: MakeDomain, isos: Path
) -> None:
    dom = domains()
    start(neurond, isos)
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    with pytest.raises(CallFailed) as e:
        await client.call(dom.path, VM, "ChangeMedia", "s", [str(isos / ISO_A)])
    assert e.value.name == ERR + "NotSupported", e.value
    assert "no CD-ROM drive" in e.value.text
    assert await client.get(dom.path, VM, "State") == "running"


async def test_images_in_use_are_refused_until_ejected(
    neurond: StartNeurond, client: Client, domains: MakeDomain, isos: Path
) -> None:
    dom = cdrom_vm(neurond, domains, isos)
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    started = time.monotonic()
    (images,) = await client.call(MANAGER_PATH, MANAGER, "ListImages")
    print(f"ListImages: {time.monotonic() - started:.3f} s")  # measured, not asserted
    rows = {i["name"].value: i for i in images}
    assert sorted(rows) == [ISO_B, ISO_A]
    assert rows[ISO_A]["used_by"].value == [dom.path]
    assert rows[ISO_A]["size"].value == 1 << 20
    assert rows[ISO_B]["used_by"].value == []
    with pytest.raises(CallFailed) as e:
        await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", [ISO_A])
    assert e.value.name == ERR + "InvalidState", e.value
    assert dom.name in e.value.text, e.value.text
    assert (isos / ISO_A).exists()
    await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", [ISO_B])
    assert not (isos / ISO_B).exists()
    await client.call(dom.path, VM, "EjectMedia")
    await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", [ISO_A])
    assert not (isos / ISO_A).exists()
    (images,) = await client.call(MANAGER_PATH, MANAGER, "ListImages")
    assert images == []
