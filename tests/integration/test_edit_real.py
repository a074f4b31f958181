"""Issue 12 on a real libvirtd with the tiny guest: Rename, SetMemory, SetVCPUs, and a VM's
owner and disks through CreateVM, Rename and a daemon restart.

Run only under the shared lock (other sessions use the same libvirtd):
    flock /tmp/neurond-libvirtd.lock .venv/bin/python -m pytest -q \
        tests/integration/test_edit_real.py
"""

from __future__ import annotations

import asyncio
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from dbus_fast import Variant

from neurond.domain.parse import METADATA_NS
from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, VM, CallFailed, Client
from tests.bus.test_owner import CREATE_RULES, USER_A, USER_B, Bus
from tests.harness import Daemon, PrivateBus
from tests.integration.conftest import (
    PREFIX,
    URI,
    LibvirtDaemons,
    MakeDomain,
    define_xml_async,
    virsh,
    virsh_sync,
)
from tests.integration.test_create_real import pool_of
from tests.polkit import PrivatePolkit

StartNeurond = Callable[..., Daemon]
LIVE = {"live": Variant("b", True)}


async def inactive_xml(uuid: str) -> str:
    return await virsh("dumpxml", "--inactive", uuid)


async def test_rename_keeps_path_and_domain(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains()
    neurond()
    new = dom.name + "-renamed"
    try:
        assert await client.get(dom.path, VM, "Owner") == 0  # defined outside neurond
        await client.call(dom.path, VM, "Rename", "s", [new])
        assert await client.get(dom.path, VM, "Name") == new
        assert await client.get(dom.path, VM, "Owner") == 0
        assert (await virsh("domname", dom.uuid)).strip() == new
        (path,) = await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", [new])
        assert path == dom.path
        await client.call(dom.path, VM, "Start", "a{sv}", [{}])
        with pytest.raises(CallFailed) as e:
            await client.call(dom.path, VM, "Rename", "s", [dom.name])
        assert e.value.name == ERR + "InvalidState"
        await client.call(dom.path, VM, "ForceOff")
        await client.call(dom.path, VM, "Rename", "s", [dom.name])
    finally:  # the fixture removes the domain by its first name
        await virsh("destroy", dom.uuid, check=False)
        await virsh("domrename", dom.uuid, dom.name, check=False)
    assert (await virsh("domname", dom.uuid)).strip() == dom.name


async def test_persistent_memory_and_vcpus(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains()
    neurond()
    await client.call(dom.path, VM, "SetMemory", "ta{sv}", [384, {}])
    await client.call(dom.path, VM, "SetVCPUs", "ua{sv}", [2, {}])
    xml = await inactive_xml(dom.uuid)
    assert re.search(r"<memory unit='KiB'>393216</memory>", xml), xml
    assert re.search(r"<vcpu[^>]*>2</vcpu>", xml), xml
    assert await client.get(dom.path, VM, "MemoryMiB") == 384
    assert await client.get(dom.path, VM, "VCPUs") == 2


def memory_mib(xml: str, tag: str) -> int:
    """<memory> (the maximum) or <currentMemory> of a domain's XML, in MiB."""
    el = ET.fromstring(xml).find(tag)
    assert el is not None and el.text is not None, xml
    assert el.get("unit", "KiB") == "KiB", xml  # libvirt writes KiB
    return int(el.text) // 1024


async def wait_balloon(uuid: str, mib: int) -> None:
    """Wait until libvirt's live <currentMemory> is ``mib``: libvirt takes it from QEMU's
    BALLOON_CHANGE events, sent once the guest's virtio_balloon driver has moved the balloon."""
    deadline = asyncio.get_running_loop().time() + 60
    while (now := memory_mib(await virsh("dumpxml", uuid), "currentMemory")) != mib:
        assert asyncio.get_running_loop().time() < deadline, f"live memory stays {now} MiB"
        await asyncio.sleep(0.1)


def vcpucount(out: str) -> dict[str, int]:
    """`virsh vcpucount` as {"maximum config": 2, "current live": 1, ...}."""
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {f"{what} {where}": int(n) for what, where, n in rows}


async def test_live_changes_refused_without_balloon_or_spare_vcpus(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    """The plain tiny guest (memballoon none, <vcpu>1</vcpu>) cannot change live: SetMemory
    live is NotSupported with QEMU's reason (no balloon device), SetVCPUs live to 2 is
    NotSupported naming the running VM's maximum of 1; neither changes anything. Without live
    the persistent definition changes while the guest runs on."""
    dom = domains()
    neurond()
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    with pytest.raises(CallFailed) as e:
        await client.call(dom.path, VM, "SetMemory", "ta{sv}", [192, LIVE])
    assert e.value.name == ERR + "NotSupported", e.value
    assert "balloon" in e.value.text, e.value.text
    with pytest.raises(CallFailed) as e:
        await client.call(dom.path, VM, "SetVCPUs", "ua{sv}", [2, LIVE])
    assert e.value.name == ERR + "NotSupported", e.value
    assert "maximum of 1," in e.value.text, e.value.text
    for xml in (await virsh("dumpxml", dom.uuid), await inactive_xml(dom.uuid)):
        assert memory_mib(xml, "memory") == memory_mib(xml, "currentMemory") == 256, xml
        assert re.search(r"<vcpu[^>]*>1</vcpu>", xml), xml

    await client.call(dom.path, VM, "SetMemory", "ta{sv}", [320, {}])
    assert memory_mib(await inactive_xml(dom.uuid), "memory") == 320
    assert memory_mib(await virsh("dumpxml", dom.uuid), "memory") == 256  # the running VM's
    assert await client.get(dom.path, VM, "MemoryMiB") == 256
    assert await client.get(dom.path, VM, "State") == "running"


async def test_live_balloon_and_vcpu_hotplug(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    """A guest with a virtio balloon (the tiny guest loads virtio_balloon), 384 MiB maximum,
    256 MiB current, and <vcpu current='1'>2</vcpu>. SetMemory live balloons down and back up
    to the maximum: libvirt's live <currentMemory> follows, and the persistent definition gets
    the value as maximum and current (the memory of the next boot). Above the running maximum
    live is NotSupported naming it, and nothing changes. MemoryMiB is the configured maximum:
    the running VM's until it stops, then the persistent one (PropertiesChanged).

    SetVCPUs live 2: under software emulation (TCG, no KVM here) QEMU hot-plugs the vCPU
    through ACPI and libvirt counts it live (from QEMU's vCPU threads); the guest kernel sees
    the new CPU offline until something in it onlines it (no udev rule in the tiny guest)."""
    dom = domains(define=False)
    root = ET.fromstring(dom.xml)
    memory, vcpu, balloon = root.find("memory"), root.find("vcpu"), root.find(".//memballoon")
    assert memory is not None and vcpu is not None and balloon is not None
    memory.text = "384"
    ET.SubElement(root, "currentMemory", unit="MiB").text = "256"
    vcpu.text, vcpu.attrib["current"] = "2", "1"
    balloon.set("model", "virtio")
    await define_xml_async(ET.tostring(root, encoding="unicode"))
    neurond()
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    await dom.wait_ready()  # virtio_balloon is loaded before the ready line
    assert await client.get(dom.path, VM, "MemoryMiB") == 384
    assert await client.get(dom.path, VM, "VCPUs") == 2

    for mib in (192, 384, 320):  # down, up to the maximum, down again
        await client.call(dom.path, VM, "SetMemory", "ta{sv}", [mib, LIVE])
        await wait_balloon(dom.uuid, mib)
        assert memory_mib(await virsh("dumpxml", dom.uuid), "memory") == 384
        persistent = await inactive_xml(dom.uuid)
        assert memory_mib(persistent, "memory") == memory_mib(persistent, "currentMemory") == mib
        assert await client.get(dom.path, VM, "MemoryMiB") == 384  # the running maximum
        print(f"SetMemory live {mib}: live and persistent <currentMemory> {mib} MiB")

    with pytest.raises(CallFailed) as e:
        await client.call(dom.path, VM, "SetMemory", "ta{sv}", [385, LIVE])
    assert e.value.name == ERR + "NotSupported", e.value
    assert "maximum of 384 MiB" in e.value.text, e.value.text
    print(f"SetMemory live 385: {e.value.text}")
    assert memory_mib(await virsh("dumpxml", dom.uuid), "currentMemory") == 320
    assert memory_mib(await inactive_xml(dom.uuid), "memory") == 320

    assert vcpucount(await virsh("vcpucount", dom.uuid))["current live"] == 1
    await client.call(dom.path, VM, "SetVCPUs", "ua{sv}", [2, LIVE])
    counts = vcpucount(await virsh("vcpucount", dom.uuid))
    print(f"SetVCPUs live 2: virsh vcpucount {counts}")
    assert counts == {
        "maximum config": 2, "maximum live": 2, "current config": 2, "current live": 2,
    }  # fmt: skip
    assert await client.get(dom.path, VM, "VCPUs") == 2
    assert await client.get(dom.path, VM, "State") == "running"

    await client.call(dom.path, VM, "ForceOff")
    await client.wait_for(
        lambda: any(c.get("MemoryMiB") == 320 for c in client.changes(dom.path)), timeout=30
    )
    assert await client.get(dom.path, VM, "VCPUs") == 2


def disks(xml: str) -> list[tuple[str, str]]:
    """(target, source file) of every disk in a domain's XML."""
    out = []
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is not None and target is not None:
            out.append((target.get("dev", ""), source.get("file", "")))
    return out


def owner_in(xml: str) -> str:
    meta = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}vm")
    assert meta is not None, xml
    return meta.get("owner", "")


def test_owner_and_disks_survive_rename_and_restart(libvirt_daemons: LibvirtDaemons) -> None:
    """A non-root user creates a VM (a test rule grants CreateVM, the shipped owner rules the
    rest); root renames it; neurond restarts. The owner stays in libvirt's metadata and on the
    bus, the path and the disk stay, and the owner may still start and stop it, B may not."""
    name = f"{PREFIX}o-{uuidlib.uuid4().hex[:8]}"
    renamed = name + "-r"
    config = {"libvirt": {"domain_type": "qemu"}, "authorization": {"polkit": True}}
    with (
        PrivateBus(include_system_policies=True) as bus,
        PrivatePolkit(bus, CREATE_RULES, shipped_rules=True),
    ):
        first = Daemon(bus, libvirt_uri=URI, config=config)
        first.dir.chmod(0o755)  # qemu (libvirt-qemu) opens the disk below it
        first.image_dir.chmod(0o755)
        again = Daemon(bus, libvirt_uri=URI)
        again.config_path.write_text(first.config_path.read_text())  # the same directories
        owners = Bus(bus)
        try:
            first.start()
            spec = f"{{'name': <'{name}'>, 'profile': <'linux'>, 'memory_mib': <uint64 256>, "
            spec += "'vcpus': <uint32 1>, 'disk_gib': <uint64 1>}"
            out = owners.ok(USER_A, MANAGER_PATH, "CreateVM", spec)
            vm, job = re.findall(r"'(/[^']+)'", out)
            owners.wait(job, "State", "completed", timeout=120)
            assert owners.get(vm, "Owner") == str(USER_A.pw_uid)
            before = virsh_sync("dumpxml", "--inactive", name)
            assert owner_in(before) == str(USER_A.pw_uid)
            attached = disks(before)
            assert attached and all(Path(f).parent == first.image_dir for _, f in attached)
            print(f"disks of {name}: {attached}")

            owners.ok(None, vm, "Rename", f"'{renamed}'")
            assert owners.get(vm, "Name") == renamed
            assert f"'{vm}'" in owners.ok(None, MANAGER_PATH, "GetVM", f"'{renamed}'")
            after = virsh_sync("dumpxml", "--inactive", renamed)
            assert disks(after) == attached and owner_in(after) == str(USER_A.pw_uid)
            assert all(Path(f).is_file() for _, f in attached)
            blk = virsh_sync("domblklist", renamed)
            assert all(f in blk for _, f in attached), blk

            first.stop()
            again.start()
            assert owners.get(vm, "Owner") == str(USER_A.pw_uid)
            assert owners.get(vm, "Name") == renamed
            assert owners.error(USER_B, vm, "Start", "{}") == ERR + "PermissionDenied"
            owners.ok(USER_A, vm, "Start", "{}")
            owners.wait(vm, "State", "running", timeout=60)
            assert owners.error(USER_B, vm, "ForceOff") == ERR + "PermissionDenied"
            owners.ok(USER_A, vm, "ForceOff")
            assert disks(virsh_sync("dumpxml", "--inactive", renamed)) == attached

            out = owners.ok(None, vm, "Delete", "{'delete_storage': <true>}")
            owners.wait(re.findall(r"'(/[^']+)'", out)[0], "State", "completed", timeout=120)
            assert not any(Path(f).exists() for _, f in attached)
        finally:
            for d in (again, first):
                d.kill()
            for leftover in (name, renamed):
                virsh_sync("destroy", leftover, check=False)
                virsh_sync("undefine", "--nvram", "--tpm", leftover, check=False)
            pool = pool_of(first.image_dir)
            if pool is not None:
                virsh_sync("pool-destroy", pool, check=False)
            first.close()
            again.close()
