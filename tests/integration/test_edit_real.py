"""Issue 12's first slice on a real libvirtd with the tiny guest: Rename, SetMemory, SetVCPUs.

Run only under the shared lock (other sessions use the same libvirtd):
    flock /tmp/neurond-libvirtd.lock .venv/bin/python -m pytest -q \
        tests/integration/test_edit_real.py
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from dbus_fast import Variant

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, VM, CallFailed, Client
from tests.harness import Daemon
from tests.integration.conftest import MakeDomain, virsh

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
        await client.call(dom.path, VM, "Rename", "s", [new])
        assert await client.get(dom.path, VM, "Name") == new
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
