"""Changing VMs after creation (issue 12, first slice): Rename, SetMemory, SetVCPUs through
D-Bus on libvirt's test driver (domain "test", running at start; host: 3072 MiB, 16 CPUs).
"""

from __future__ import annotations

from typing import Any

import pytest
from dbus_fast import Variant

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, TEST_PATH, VM, CallFailed, Client
from tests.bus.test_create import QEMU, created, vm_props
from tests.harness import Daemon, PrivateBus, gdbus

TEST_HOST_MIB, TEST_HOST_CPUS = 3072, 16  # libvirt's test driver host (virNodeGetInfo)


async def fails(client: Client, path: str, member: str, sig: str, body: list[Any]) -> CallFailed:
    with pytest.raises(CallFailed) as e:
        await client.call(path, VM, member, sig, body)
    return e.value


async def force_off(client: Client) -> None:
    await client.call(TEST_PATH, VM, "ForceOff")
    assert await client.get(TEST_PATH, VM, "State") == "shutoff"


async def test_api_version_is_3(daemon: Daemon, client: Client) -> None:
    assert await client.get(MANAGER_PATH, MANAGER, "APIVersion") == 3


async def test_rename_keeps_the_path_and_signals_the_name(daemon: Daemon, client: Client) -> None:
    await force_off(client)
    await client.call(TEST_PATH, VM, "Rename", "s", ["win11-renamed"])
    assert await client.get(TEST_PATH, VM, "Name") == "win11-renamed"
    await client.wait_for(
        lambda: any(c.get("Name") == "win11-renamed" for c in client.changes(TEST_PATH))
    )
    (path,) = await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", ["win11-renamed"])
    assert path == TEST_PATH
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [row[0] for row in vms] == ["win11-renamed"]
    with pytest.raises(CallFailed) as e:
        await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", ["test"])
    assert e.value.name == ERR + "VMNotFound"
    # renamed again, and to the same name (a no-op)
    await client.call(TEST_PATH, VM, "Rename", "s", ["test"])
    await client.call(TEST_PATH, VM, "Rename", "s", ["test"])
    assert await client.get(TEST_PATH, VM, "Name") == "test"


async def test_rename_a_running_vm_is_invalid_state(daemon: Daemon, client: Client) -> None:
    e = await fails(client, TEST_PATH, "Rename", "s", ["other"])
    assert e.name == ERR + "InvalidState", e
    assert "running" in e.text
    assert await client.get(TEST_PATH, VM, "Name") == "test"


@pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 65, "a/b", "é", "a\nb"])
async def test_rename_bad_names_are_invalid_argument(
    daemon: Daemon, client: Client, bad: str
) -> None:
    e = await fails(client, TEST_PATH, "Rename", "s", [bad])
    assert e.name == ERR + "InvalidArgument", e
    assert await client.get(TEST_PATH, VM, "Name") == "test"


async def test_rename_to_a_taken_name_is_vm_already_exists(
    start_daemon: Any, client: Client
) -> None:
    start_daemon(config=QEMU)
    other = await created(client, name="other")
    assert (await vm_props(client, other))["State"] == "shutoff"
    e = await fails(client, other, "Rename", "s", ["test"])
    assert e.name == ERR + "VMAlreadyExists", e
    assert (await vm_props(client, other))["Name"] == "other"
    await client.call(other, VM, "Rename", "s", ["adobe"])
    assert (await vm_props(client, other))["Name"] == "adobe"


async def test_set_memory_persistent_is_read_back(daemon: Daemon, client: Client) -> None:
    """MemoryMiB shows the running definition: a persistent change shows once the VM is off."""
    before = await client.get(TEST_PATH, VM, "MemoryMiB")
    await client.call(TEST_PATH, VM, "SetMemory", "ta{sv}", [512, {}])
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == before
    await force_off(client)
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == 512
    await client.wait_for(lambda: any(c.get("MemoryMiB") == 512 for c in client.changes(TEST_PATH)))
    await client.call(TEST_PATH, VM, "SetMemory", "ta{sv}", [TEST_HOST_MIB, {}])
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == TEST_HOST_MIB
    # a shut-off VM: the definition only, live or not
    await client.call(TEST_PATH, VM, "SetMemory", "ta{sv}", [1024, {"live": Variant("b", True)}])
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == 1024


async def test_live_changes_on_the_running_vm(daemon: Daemon, client: Client) -> None:
    """The test driver balloons and hot-unplugs; above the live maximum is NotSupported."""
    live = {"live": Variant("b", True)}
    await client.call(TEST_PATH, VM, "SetVCPUs", "ua{sv}", [1, live])
    await client.call(TEST_PATH, VM, "SetMemory", "ta{sv}", [512, live])
    e = await fails(client, TEST_PATH, "SetVCPUs", "ua{sv}", [TEST_HOST_CPUS, live])
    assert e.name == ERR + "NotSupported", e
    assert "running VM" in e.text and "live" in e.text, e.text
    await force_off(client)  # the persistent definition took the accepted changes only
    assert await client.get(TEST_PATH, VM, "VCPUs") == 1
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == 512


@pytest.mark.parametrize("mib", [0, 127, TEST_HOST_MIB + 1, 2**64 - 1])
async def test_set_memory_out_of_bounds_is_invalid_argument(
    daemon: Daemon, client: Client, mib: int
) -> None:
    before = await client.get(TEST_PATH, VM, "MemoryMiB")
    e = await fails(client, TEST_PATH, "SetMemory", "ta{sv}", [mib, {}])
    assert e.name == ERR + "InvalidArgument", e
    assert "128" in e.text and str(TEST_HOST_MIB) in e.text, e.text
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == before


async def test_the_bounds_themselves_are_accepted(daemon: Daemon, client: Client) -> None:
    await force_off(client)
    await client.call(TEST_PATH, VM, "SetMemory", "ta{sv}", [128, {}])
    await client.call(TEST_PATH, VM, "SetVCPUs", "ua{sv}", [TEST_HOST_CPUS, {}])
    assert await client.get(TEST_PATH, VM, "MemoryMiB") == 128
    assert await client.get(TEST_PATH, VM, "VCPUs") == TEST_HOST_CPUS


async def test_set_memory_below_the_windows_minimum_is_invalid_argument(
    start_daemon: Any, client: Client
) -> None:
    """The VM's profile (neurond's metadata) sets the floor: Windows 11 4096 MiB, Windows 10
    2048 MiB. The test host has 3072 MiB, so no memory fits a Windows 11 VM here."""
    start_daemon(config=QEMU)
    # small disks: the test driver's pool is small
    win11 = await created(client, name="win11", profile="windows11", disk_gib=1)
    win10 = await created(client, name="win10", profile="windows10", disk_gib=1)
    for mib, bound in ((2048, "4096 MiB (the windows11 profile's minimum)"), (4096, "3072 MiB")):
        e = await fails(client, win11, "SetMemory", "ta{sv}", [mib, {}])
        assert e.name == ERR + "InvalidArgument", e
        assert bound in e.text, e.text
    assert (await vm_props(client, win11))["MemoryMiB"] == 8192
    e = await fails(client, win10, "SetMemory", "ta{sv}", [2047, {}])
    assert e.name == ERR + "InvalidArgument" and "2048 MiB" in e.text, e.text
    await client.call(win10, VM, "SetMemory", "ta{sv}", [2048, {}])
    assert (await vm_props(client, win10))["MemoryMiB"] == 2048
    # The VM defined outside neurond has no profile: only the general floor.
    await client.call(TEST_PATH, VM, "SetMemory", "ta{sv}", [128, {}])
    # CreateVM holds to the same floor.
    with pytest.raises(CallFailed) as c:
        await created(client, name="small", profile="windows11", memory_mib=2048)
    assert c.value.name == ERR + "InvalidArgument" and "4096" in c.value.text, c.value.text


async def test_set_vcpus_persistent_is_read_back(daemon: Daemon, client: Client) -> None:
    await client.call(TEST_PATH, VM, "SetVCPUs", "ua{sv}", [1, {}])
    await force_off(client)
    assert await client.get(TEST_PATH, VM, "VCPUs") == 1
    await client.call(TEST_PATH, VM, "SetVCPUs", "ua{sv}", [4, {}])  # above the old maximum
    assert await client.get(TEST_PATH, VM, "VCPUs") == 4


@pytest.mark.parametrize("count", [0, TEST_HOST_CPUS + 1, 2**32 - 1])
async def test_set_vcpus_out_of_bounds_is_invalid_argument(
    daemon: Daemon, client: Client, count: int
) -> None:
    before = await client.get(TEST_PATH, VM, "VCPUs")
    e = await fails(client, TEST_PATH, "SetVCPUs", "ua{sv}", [count, {}])
    assert e.name == ERR + "InvalidArgument", e
    assert str(TEST_HOST_CPUS) in e.text, e.text
    assert await client.get(TEST_PATH, VM, "VCPUs") == before


@pytest.mark.parametrize("member,sig,value", [("SetMemory", "t", 512), ("SetVCPUs", "u", 1)])
async def test_unknown_or_mistyped_options_are_invalid_argument(
    daemon: Daemon, client: Client, member: str, sig: str, value: int
) -> None:
    for options in ({"bogus": Variant("b", True)}, {"live": Variant("s", "yes")}):
        e = await fails(client, TEST_PATH, member, sig + "a{sv}", [value, options])
        assert e.name == ERR + "InvalidArgument", e


@pytest.mark.parametrize(
    "member,args",
    [("Rename", ("'other'",)), ("SetMemory", ("512", "{}")), ("SetVCPUs", ("1", "{}"))],
)
async def test_non_root_is_refused(
    private_bus: PrivateBus, daemon: Daemon, client: Client, member: str, args: tuple[str, ...]
) -> None:
    before = await vm_props(client, TEST_PATH)
    out = gdbus(
        private_bus, "call", "--dest", "org.neuronos.Neuron1", "--object-path", TEST_PATH,
        "--method", f"{VM}.{member}", *args, as_nobody=True, timeout=15,
    )  # fmt: skip
    assert out.returncode != 0 and "PermissionDenied" in out.stderr, out.stderr
    assert await vm_props(client, TEST_PATH) == before
