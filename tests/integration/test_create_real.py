"""CreateVM and Delete on a real libvirtd (qemu:///system): what is left behind, seen from outside.

Domains are defined, not booted (except the one linux VM that must reach running). Leftovers
are checked with virsh (domains, volumes) and by listing the image and state directories,
libvirt's NVRAM directory and /dev/shm. Every VM is named ``nrdtest-…`` so the session's
cleanup catches whatever a failed test leaves.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import tomllib
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bus.conftest import ERR, HOOKS, JOB, VM, CallFailed, Client
from tests.bus.test_create import create, spec
from tests.fixtures.sysfs import expected
from tests.harness import Daemon, PrivateBus, to_toml
from tests.integration.conftest import (
    PREFIX,
    URI,
    Guest,
    LibvirtDaemons,
    undefine_sync,
    virsh,
    virsh_list_all,
    virsh_sync,
)

QEMU = {"libvirt": {"domain_type": "qemu"}}
LIBVIRT_NVRAM = Path("/var/lib/libvirt/qemu/nvram")
STEPS = ["record", "volume", "nvram", "shm", "define", "autostart", "finish"]


def name() -> str:
    return f"{PREFIX}c-{uuidlib.uuid4().hex[:8]}"


async def wait_job(client: Client, job: str, timeout: float = 60.0) -> tuple[str, str, str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await client.get(job, JOB, "State")
        if state in ("completed", "failed", "cancelled"):
            return (
                state,
                await client.get(job, JOB, "ErrorName"),
                await client.get(job, JOB, "ErrorMessage"),
            )
        assert asyncio.get_running_loop().time() < deadline, f"job {job} still {state}"
        await asyncio.sleep(0.05)


def uuid_of(path: str) -> str:
    return path.rsplit("/", 1)[1].replace("_", "-")


def pool_of(directory: Path) -> str | None:
    """The name of the libvirt pool whose target is ``directory``, if any."""
    for pool in virsh_sync("pool-list", "--all", "--name").split():
        xml = virsh_sync("pool-dumpxml", pool, check=False)
        if xml and ET.fromstring(xml).findtext("./target/path") == str(directory):
            return pool
    return None


def volumes(directory: Path) -> list[str]:
    pool = pool_of(directory)
    if pool is None:
        return []
    virsh_sync("pool-refresh", pool, check=False)
    return [line.split()[0] for line in virsh_sync("vol-list", pool).splitlines() if line.strip()]


def assert_nothing_left(d: Daemon, vm_name: str, uuid: str) -> None:
    assert vm_name not in virsh_list_all()
    assert volumes(d.image_dir) == []
    assert os.listdir(d.image_dir) == []
    assert os.listdir(d.state_dir) == []
    assert [n for n in os.listdir("/dev/shm") if uuid in n] == []
    if LIBVIRT_NVRAM.is_dir():
        assert [n for n in os.listdir(LIBVIRT_NVRAM) if vm_name in n] == []


@pytest.fixture
def real(
    libvirt_daemons: LibvirtDaemons, start_daemon: Callable[..., Daemon]
) -> Iterator[Callable[..., Daemon]]:
    """``real(config=…, faults=…)``: neurond on qemu:///system; its pool goes at teardown."""
    started: list[Daemon] = []

    def start(faults: str = "", config: dict[str, Any] | None = None) -> Daemon:
        d = start_daemon(
            libvirt_uri=URI,
            config={**QEMU, **(config or {})},
            extra_args=HOOKS if faults else (),
            env={"NEUROND_FAULTS": faults} if faults else None,
        )
        started.append(d)
        return d

    yield start
    for leftover in virsh_sync("list", "--all", "--name").split():  # what a failed test left
        if leftover.startswith(PREFIX + "c-"):
            undefine_sync(leftover)
    for d in started:
        pool = pool_of(d.image_dir)
        if pool is not None:
            virsh_sync("pool-destroy", pool, check=False)


@pytest.fixture
def media() -> Iterator[Path]:
    """An ISO root qemu (user libvirt-qemu) can read: pytest's tmp_path is 0700 root."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX + "media-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("step", STEPS)
async def test_a_create_failing_at_each_step_leaves_nothing(
    real: Callable[..., Daemon], client: Client, step: str
) -> None:
    d = real(faults=f"create.{step}:libvirt")
    vm_name = name()
    vm, job = await create(client, name=vm_name, profile="windows11", looking_glass=True,
                           autostart=True)  # fmt: skip
    state, error, _ = await wait_job(client, job)
    assert (state, error) == ("failed", ERR + "VMCreationFailed")
    assert_nothing_left(d, vm_name, uuid_of(vm))


async def test_a_libvirt_failure_at_define_leaves_nothing(
    real: Callable[..., Daemon], client: Client
) -> None:
    d = real(faults="virt.define:libvirt")
    vm_name = name()
    vm, job = await create(client, name=vm_name, profile="windows11")
    assert (await wait_job(client, job))[:2] == ("failed", ERR + "VMCreationFailed")
    assert_nothing_left(d, vm_name, uuid_of(vm))


async def test_a_cancelled_create_leaves_nothing(
    real: Callable[..., Daemon], client: Client
) -> None:
    d = real(faults="create.autostart:delay:3")
    vm_name = name()
    vm, job = await create(client, name=vm_name, profile="windows11", looking_glass=True,
                           autostart=True)  # fmt: skip
    deadline = asyncio.get_running_loop().time() + 30
    while vm_name not in virsh_list_all():  # defined: everything but autostart is made
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert volumes(d.image_dir) and os.listdir(d.state_dir)
    await client.call(job, JOB, "Cancel")
    assert (await wait_job(client, job))[:2] == ("cancelled", ERR + "Cancelled")
    assert_nothing_left(d, vm_name, uuid_of(vm))


async def test_sigkill_mid_create_then_restart_leaves_nothing(
    real: Callable[..., Daemon], client: Client, start_daemon: Callable[..., Daemon]
) -> None:
    d = real(faults="create.autostart:delay:30")
    vm_name = name()
    vm, _ = await create(client, name=vm_name, profile="windows11", looking_glass=True,
                         autostart=True)  # fmt: skip
    deadline = asyncio.get_running_loop().time() + 30
    while vm_name not in virsh_list_all():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert d.proc is not None
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    assert vm_name in virsh_list_all() and os.listdir(d.state_dir)  # half made
    # An unrelated file in each directory stays.
    (d.image_dir / "not-ours.iso").write_bytes(b"x")
    (d.state_dir / "notes.txt").write_text("x")
    again = Daemon(d.bus, libvirt_uri=URI, config=QEMU)
    again.image_dir.rmdir()
    again.state_dir.rmdir()
    again.image_dir, again.state_dir = d.image_dir, d.state_dir
    again.config_path.write_text(d.config_path.read_text())
    try:
        again.start()
        assert vm_name not in virsh_list_all()
        assert volumes(d.image_dir) == ["not-ours.iso"]
        assert os.listdir(d.image_dir) == ["not-ours.iso"]
        assert os.listdir(d.state_dir) == ["notes.txt"]
        assert [n for n in os.listdir("/dev/shm") if uuid_of(vm) in n] == []
    finally:
        again.close()


async def test_windows11_uefi_secure_boot_tpm_defined_and_deleted(
    real: Callable[..., Daemon], client: Client
) -> None:
    d = real()
    vm_name = name()
    vm, job = await create(client, name=vm_name, profile="windows11")
    assert (await wait_job(client, job))[:2] == ("completed", "")
    xml = ET.fromstring(await virsh("dumpxml", "--inactive", vm_name))
    loader = xml.find("./os/loader")
    assert loader is not None and loader.get("secure") == "yes"
    assert "secboot" in (loader.text or "")
    nvram = Path(xml.findtext("./os/nvram") or "")
    assert nvram.parent == d.image_dir and nvram.is_file()
    assert xml.find("./devices/tpm[@model='tpm-crb']/backend[@type='emulator']") is not None
    assert xml.find("./features/hyperv/relaxed[@state='on']") is not None
    assert xml.find("./features/smm[@state='on']") is not None
    props = await client.get(vm, VM, "State")
    assert props == "shutoff"
    (djob,) = await client.call(vm, VM, "Delete", "a{sv}", [spec(delete_storage=True)])
    assert (await wait_job(client, djob))[:2] == ("completed", "")
    assert not nvram.exists()
    assert_nothing_left(d, vm_name, uuid_of(vm))


async def test_delete_storage_never_removes_the_install_iso(
    libvirt_daemons: LibvirtDaemons, private_bus: PrivateBus, client: Client
) -> None:
    """The ISO sits in the image directory, so it is a volume of the VM's pool too: it stays."""
    d = Daemon(private_bus, libvirt_uri=URI, config=QEMU)
    iso = d.image_dir / "install.iso"
    iso.write_bytes(b"\0" * 65536)
    config = tomllib.loads(d.config_path.read_text())
    config["storage"]["iso_roots"] = [str(d.image_dir)]
    d.config_path.write_text(to_toml(config))
    try:
        d.start()
        vm_name = name()
        vm, job = await create(client, name=vm_name, profile="linux", disk_gib=1, iso=str(iso))
        assert (await wait_job(client, job))[:2] == ("completed", "")
        assert sorted(volumes(d.image_dir)) == sorted([iso.name, f"{vm_name}-{uuid_of(vm)}.qcow2"])
        (djob,) = await client.call(vm, VM, "Delete", "a{sv}", [spec(delete_storage=True)])
        assert (await wait_job(client, djob))[:2] == ("completed", "")
        assert vm_name not in virsh_list_all()
        assert volumes(d.image_dir) == [iso.name]
        assert os.listdir(d.image_dir) == [iso.name]
    finally:
        d.close()
        pool = pool_of(d.image_dir)
        if pool is not None:
            virsh_sync("pool-destroy", pool, check=False)


async def test_delete_without_storage_keeps_the_disk(
    real: Callable[..., Daemon], client: Client
) -> None:
    d = real()
    vm_name = name()
    vm, job = await create(client, name=vm_name, profile="windows10", disk_gib=2)
    assert (await wait_job(client, job))[:2] == ("completed", "")
    (djob,) = await client.call(vm, VM, "Delete", "a{sv}", [spec()])
    assert (await wait_job(client, djob))[:2] == ("completed", "")
    assert vm_name not in virsh_list_all()
    assert volumes(d.image_dir) == [f"{vm_name}-{uuid_of(vm)}.qcow2"]
    assert os.listdir(d.image_dir) == [f"{vm_name}-{uuid_of(vm)}.qcow2"]  # NVRAM gone


async def create_tiny_linux(client: Client, guest: Guest, media: Path, vm_name: str) -> str:
    """CreateVM of a Linux VM that boots the tiny guest's kernel and initrd (copied into
    ``media``, an ISO root of the daemon); its path, once the job completed."""
    shutil.copy(guest.kernel, media / "vmlinuz")
    shutil.copy(guest.initrd_plain, media / "initrd.img")
    vm, job = await create(
        client, name=vm_name, profile="linux", memory_mib=256, vcpus=1, disk_gib=1,
        kernel=str(media / "vmlinuz"), initrd=str(media / "initrd.img"),
        cmdline="console=ttyS0 quiet",
    )  # fmt: skip
    assert (await wait_job(client, job))[:2] == ("completed", "")
    return vm


async def test_linux_vm_with_the_tiny_guest_starts(
    real: Callable[..., Daemon], client: Client, guest: Guest, media: Path
) -> None:
    d = real(config={"storage": {"iso_roots": [str(media)]}, "timeouts": {"shutdown_s": 3}})
    d.dir.chmod(0o755)
    d.image_dir.chmod(0o755)
    vm_name = name()
    vm = await create_tiny_linux(client, guest, media, vm_name)
    await client.call(vm, VM, "Start", "a{sv}", [{}])
    deadline = asyncio.get_running_loop().time() + 30
    while await client.get(vm, VM, "State") != "running":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert virsh_list_all()[vm_name] == "running"
    with pytest.raises(CallFailed) as e:  # running: only with force
        await client.call(vm, VM, "Delete", "a{sv}", [spec(delete_storage=True)])
    assert e.value.name == ERR + "InvalidState"
    (djob,) = await client.call(vm, VM, "Delete", "a{sv}", [spec(delete_storage=True, force=True)])
    assert (await wait_job(client, djob, timeout=120))[:2] == ("completed", "")
    assert_nothing_left(d, vm_name, uuid_of(vm))


async def test_gpu_with_iommu_off_fails_before_anything_is_written(
    real: Callable[..., Daemon], client: Client
) -> None:
    sys_root, proc = expected.roots("iommu-off")
    d = real(config={"hardware": {"sysfs_root": str(sys_root), "procfs_root": str(proc)}})
    before = virsh_list_all()
    vm_name = name()
    with pytest.raises(CallFailed) as e:
        await create(client, name=vm_name, profile="windows11", gpu="0000:01:00.0",
                     looking_glass=True)  # fmt: skip
    assert e.value.name == ERR + "IOMMUError"
    assert virsh_list_all() == before
    assert pool_of(d.image_dir) is None  # not even the pool was made
    assert os.listdir(d.image_dir) == [] and os.listdir(d.state_dir) == []
