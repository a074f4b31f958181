"""Issue 12 on a real libvirtd with the tiny guest: Rename, SetMemory, SetVCPUs, and a VM's
owner and disks through CreateVM, Rename and a daemon restart.

Run only under the shared lock (other sessions use the same libvirtd):
    flock /tmp/neurond-libvirtd.lock .venv/bin/python -m pytest -q \
        tests/integration/test_edit_real.py
"""

from __future__ import annotations

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
from tests.integration.conftest import PREFIX, URI, LibvirtDaemons, MakeDomain, virsh, virsh_sync
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


async def test_live_changes_on_a_running_guest(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    """The tiny guest has no balloon (memballoon none) and boots without hot-pluggable vCPUs:
    live changes are NotSupported with QEMU's reason, and nothing changes; without live the
    persistent definition changes while the guest runs on."""
    dom = domains()
    neurond()
    await client.call(dom.path, VM, "Start", "a{sv}", [{}])
    for member, sig, value in (("SetMemory", "t", 192), ("SetVCPUs", "u", 2)):
        try:
            await client.call(dom.path, VM, member, sig + "a{sv}", [value, LIVE])
            print(f"{member} live {value}: accepted")
        except CallFailed as e:
            assert e.name == ERR + "NotSupported", e
            print(f"{member} live {value}: {e.text}")
    await client.call(dom.path, VM, "SetMemory", "ta{sv}", [320, {}])
    xml = await inactive_xml(dom.uuid)
    assert re.search(r"<memory unit='KiB'>327680</memory>", xml), xml
    assert await client.get(dom.path, VM, "State") == "running"


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
