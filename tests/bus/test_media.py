"""ChangeMedia and EjectMedia through D-Bus on libvirt's test driver (issue 12).

The test driver lives inside the daemon, so the medium is read back through the public
interface: ListImages' ``used_by`` names the VMs whose definitions refer to an image (the ISO
root here is the image directory). The test driver has no virDomainUpdateDeviceFlags: a
running VM's media are refused there with NotSupported, and changed for real in
tests/integration/test_media_real.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from neurond.bus.service import ACTIONS, media_action
from neurond.core.states import VMState
from tests.bus.conftest import (
    ERR,
    FAKE_POLKIT_POLICY,
    HOOKS,
    MANAGER,
    MANAGER_PATH,
    TEST_PATH,
    VM,
    CallFailed,
    Client,
    FakePolkit,
    NobodyClient,
)
from tests.bus.test_create import QEMU, create, created, vm_props, wait_job
from tests.harness import Daemon, PrivateBus, gdbus
from tests.journal import PrivateJournal

ISO_A, ISO_B = "install.iso", "drivers.iso"


async def used_by(client: Client) -> dict[str, list[str]]:
    """The ISOs' users (VM disks in the image directory are left out)."""
    (images,) = await client.call(MANAGER_PATH, MANAGER, "ListImages")
    return {
        i["name"].value: list(i["used_by"].value)
        for i in images
        if i["name"].value.endswith(".iso")
    }


async def fails(client: Client, path: str, member: str, *args: str) -> CallFailed:
    with pytest.raises(CallFailed) as e:
        await client.call(path, VM, member, "s" * len(args), list(args))
    return e.value


def start_with_isos(start_daemon: Any, tmp_path: Path, **kw: Any) -> tuple[Daemon, Path]:
    """neurond whose image directory is also its ISO root, holding two ISOs."""
    images = tmp_path / "images"
    images.mkdir()
    for name in (ISO_A, ISO_B):
        (images / name).write_bytes(b"\0" * 4096)
    storage = {"image_dir": str(images), "iso_roots": [str(images)]}
    return start_daemon(config={**QEMU, "storage": storage}, **kw), images


@pytest.fixture
def isos(start_daemon: Any, tmp_path: Path) -> tuple[Daemon, Path]:
    return start_with_isos(start_daemon, tmp_path)


async def test_change_and_eject_on_a_shut_off_vm(isos: tuple[Daemon, Path], client: Client) -> None:
    d, images = isos
    vm = await created(client, name="media", iso=str(images / ISO_A))
    assert (await vm_props(client, vm))["State"] == "shutoff"
    assert await used_by(client) == {ISO_A: [vm], ISO_B: []}
    assert await client.get(vm, VM, "Media") == str(images / ISO_A)
    await client.call(vm, VM, "ChangeMedia", "s", [str(images / ISO_B)])
    assert await used_by(client) == {ISO_A: [], ISO_B: [vm]}
    assert await client.get(vm, VM, "Media") == str(images / ISO_B)
    await client.call(vm, VM, "EjectMedia")
    assert await used_by(client) == {ISO_A: [], ISO_B: []}
    assert await client.get(vm, VM, "Media") == ""

    # each change was signalled with the new value, in order
    def media_signals() -> list[str]:
        return [c["Media"] for c in client.changes(vm) if "Media" in c]

    await client.wait_for(lambda: media_signals()[-2:] == [str(images / ISO_B), ""])
    await client.call(vm, VM, "EjectMedia")  # an empty drive stays empty
    await client.call(vm, VM, "ChangeMedia", "s", [str(images / ISO_A)])
    assert await used_by(client) == {ISO_A: [vm], ISO_B: []}
    assert (await vm_props(client, vm))["State"] == "shutoff"
    # the journal (console here) has the change with its facts
    assert f"inserted {images / ISO_A} in the CD-ROM (persistent)" in d.stderr_text()


async def test_running_vm_on_the_test_driver_is_not_supported(
    isos: tuple[Daemon, Path], client: Client
) -> None:
    """The test driver cannot swap media live: NotSupported with libvirt's reason, and the
    medium stays as it was."""
    _, images = isos
    vm = await created(client, name="media", iso=str(images / ISO_A))
    await client.call(vm, VM, "Start", "a{sv}", [{}])
    assert (await vm_props(client, vm))["State"] == "running"
    e = await fails(client, vm, "ChangeMedia", str(images / ISO_B))
    assert e.name == ERR + "NotSupported", e
    assert "not supported" in e.text, e.text
    e = await fails(client, vm, "EjectMedia")
    assert e.name == ERR + "NotSupported", e
    assert await used_by(client) == {ISO_A: [vm], ISO_B: []}
    assert await client.get(vm, VM, "Media") == str(images / ISO_A)
    assert (await vm_props(client, vm))["State"] == "running"


async def test_a_vm_without_cdrom_is_not_supported(
    isos: tuple[Daemon, Path], client: Client
) -> None:
    _, images = isos
    await client.call(TEST_PATH, VM, "ForceOff")
    for member, args in (("ChangeMedia", (str(images / ISO_A),)), ("EjectMedia", ())):
        e = await fails(client, TEST_PATH, member, *args)
        assert e.name == ERR + "NotSupported", e
        assert "no CD-ROM drive" in e.text, e.text
    vm = await created(client, name="nocd")  # created without an ISO: no drive either
    e = await fails(client, vm, "EjectMedia")
    assert e.name == ERR + "NotSupported", e
    assert await client.get(vm, VM, "Media") == ""
    assert await used_by(client) == {ISO_A: [], ISO_B: []}


async def test_paths_outside_the_iso_roots_are_invalid_argument(
    isos: tuple[Daemon, Path], client: Client, tmp_path: Path
) -> None:
    _, images = isos
    vm = await created(client, name="media", iso=str(images / ISO_A))
    secret = tmp_path / "secret.iso"
    secret.write_bytes(b"secret")
    (images / "escape.iso").symlink_to(secret)
    (images / "dir").mkdir()
    (images / "dirlink").symlink_to(tmp_path)
    bad = [
        "", "relative.iso", ISO_B, str(secret), str(images / "escape.iso"),
        str(images / "dir"), str(images), str(images / "missing.iso"),
        f"{images}/../{images.name}/{ISO_B}", str(images / "dirlink" / "secret.iso"),
        "/" + "a" * 5000, "/dev/null", "/etc/shadow", "/proc/self/environ",
        f"{images}/{ISO_B}\n", "/\u00e9\u2028.iso",
    ]  # fmt: skip
    for path in bad:
        e = await fails(client, vm, "ChangeMedia", path)
        assert e.name == ERR + "InvalidArgument", (path, e)
        assert "iso" in e.text, e.text
        assert len(e.text) < 400, e.text  # the message quotes a bounded part of the path
    assert (await used_by(client))[ISO_A] == [vm]  # unchanged
    # a symlink that stays inside the root is followed; the real path goes into the drive
    (images / "link.iso").symlink_to(images / ISO_B)
    await client.call(vm, VM, "ChangeMedia", "s", [str(images / "link.iso")])
    assert (await used_by(client))[ISO_B] == [vm]


async def test_while_busy_media_are_invalid_state(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    """A VM in transition (here: being created, its define step held) refuses media changes."""
    faults = {"NEUROND_FAULTS": "create.define:delay:2"}
    _, images = start_with_isos(start_daemon, tmp_path, extra_args=HOOKS, env=faults)
    iso = images / ISO_A
    vm, job = await create(client, name="busy")
    assert (await vm_props(client, vm))["State"] == "creating"
    for member, args in (("ChangeMedia", (str(iso),)), ("EjectMedia", ())):
        e = await fails(client, vm, member, *args)
        assert e.name == ERR + "InvalidState", e
        assert "creat" in e.text, e.text
    assert await wait_job(client, job) == ("completed", "")


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (VMState.RUNNING, "vm-lifecycle"),
        (VMState.PAUSED, "vm-lifecycle"),
        (VMState.SHUTOFF, "vm-manage"),
        (VMState.CRASHED, "vm-manage"),  # refused by the state table after authorization
    ],
)
def test_media_action_depends_on_the_state(state: VMState, action: str) -> None:
    for member in ("ChangeMedia", "EjectMedia"):
        assert media_action(member, state) == action
        assert ACTIONS[(VM, member)] == "vm-manage"  # what the static table says


@pytest.mark.parametrize(("running", "action"), [(True, "vm-lifecycle"), (False, "vm-manage")])
async def test_nobody_is_refused_the_action_of_the_state(
    private_bus: PrivateBus, daemon: Daemon, client: Client, running: bool, action: str
) -> None:
    """A running VM asks for vm-lifecycle, a shut-off one for vm-manage; the refusal comes
    before the path is looked at (nobody learns whether /root/x exists)."""
    if not running:
        await client.call(TEST_PATH, VM, "ForceOff")
    before = await vm_props(client, TEST_PATH)
    for member, args in (("ChangeMedia", ("'/root/x.iso'",)), ("EjectMedia", ())):
        out = gdbus(
            private_bus, "call", "--dest", "org.neuronos.Neuron1", "--object-path", TEST_PATH,
            "--method", f"{VM}.{member}", *args, as_nobody=True, timeout=15,
        )  # fmt: skip
        assert out.returncode != 0 and "PermissionDenied" in out.stderr, out.stderr
        assert f"org.neuronos.neuron1.{action}" in out.stderr, out.stderr
    assert await vm_props(client, TEST_PATH) == before


async def test_a_vm_started_while_media_wait_is_not_changed_on_the_old_authorization(
    tmp_path: Path,
) -> None:
    """ChangeMedia on a shut-off VM is authorized as vm-manage; if the VM starts before the
    change is made (here: while ChangeMedia waits for a DeleteImage, whose scan of the domains
    is held by a delay fault), that authorization is not the one a running VM needs
    (vm-lifecycle): the call ends in InvalidState and the medium stays. The caller is nobody
    with a (fake) polkit that grants vm-manage only."""
    fake = FakePolkit(lambda action: (action.endswith(".vm-manage"), False))
    faults = {"NEUROND_FAULTS": "virt.domain_files:delay:3"}
    with PrivateBus(extra_config=FAKE_POLKIT_POLICY) as bus:
        await fake.start(bus.address)
        images = tmp_path / "images"
        images.mkdir()
        for name in (ISO_A, ISO_B, "old.img"):
            (images / name).write_bytes(b"\0" * 4096)
        storage = {"image_dir": str(images), "iso_roots": [str(images)]}
        config = {**QEMU, "storage": storage, "authorization": {"polkit": True}}
        root = Client(await MessageBus(bus_address=bus.address).connect())
        with Daemon(bus, config=config, extra_args=HOOKS, env=faults):
            nobody = await NobodyClient().start(bus.address)
            try:
                vm = await created(root, name="media", iso=str(images / ISO_A))
                delete = asyncio.ensure_future(
                    root.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", ["old.img"])
                )
                change = asyncio.ensure_future(
                    nobody.call(vm, VM, "ChangeMedia", "s", [str(images / ISO_B)])
                )
                await root.wait_for(lambda: len(fake.checks) == 1, timeout=10)
                assert fake.checks[0][0] == "org.neuronos.neuron1.vm-manage", fake.checks
                await root.call(vm, VM, "Start", "a{sv}", [{}])
                assert await change == ERR + "InvalidState"
                await delete
                assert await root.get(vm, VM, "Media") == str(images / ISO_A)
                assert await root.get(vm, VM, "State") == "running"
            finally:
                await nobody.close()
                root.bus.disconnect()
                fake.close()


@pytest.fixture
def journal() -> Iterator[PrivateJournal]:
    with PrivateJournal() as j:
        yield j


async def test_changes_reach_the_journal_with_their_fields(
    journal: PrivateJournal, start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    """A real journald (tests/journal.py): each change carries NEUROND_VM, NEUROND_MEDIA and
    NEUROND_LIVE."""
    args = ["--log-target", "journal"]
    _, images = start_with_isos(start_daemon, tmp_path, wrap=journal.wrap, extra_args=args)
    vm = await created(client, name="journaled", iso=str(images / ISO_A))
    await client.call(vm, VM, "ChangeMedia", "s", [str(images / ISO_B)])
    await client.call(vm, VM, "EjectMedia")
    ident = {"SYSLOG_IDENTIFIER": "neurond", "NEUROND_VM": "journaled"}
    inserted = journal.wait_for(NEUROND_MEDIA=str(images / ISO_B), **ident)
    assert inserted["NEUROND_LIVE"] == "false", inserted
    assert "inserted" in inserted["MESSAGE"], inserted
    ejected = journal.wait_for(lambda e: "ejected" in e["MESSAGE"], **ident)
    assert ejected["NEUROND_MEDIA"] == "" and ejected["NEUROND_LIVE"] == "false", ejected
