"""CreateVM and Delete through D-Bus on libvirt's test driver (fast breadth).

The test driver keeps domains and volumes in the daemon's memory, so what can be seen from
outside here is the bus (objects, properties, jobs, errors) and the files neurond writes itself
(NVRAM copies in ``storage.image_dir``, create records in ``storage.state_dir``, the Looking
Glass file in /dev/shm). Leftovers in libvirt are checked on a real libvirtd in
tests/integration/test_create_real.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from tests.bus.conftest import (
    ERR,
    HOOKS,
    JOB,
    MANAGER,
    MANAGER_PATH,
    OBJECT_MANAGER,
    ROOT,
    TEST_PATH,
    VM,
    CallFailed,
    Client,
)
from tests.fixtures.sysfs import expected
from tests.harness import Daemon

PROFILES = {  # API.md/issue defaults: vcpus, memory_mib
    "windows11": (4, 8192),
    "windows10": (4, 4096),
    "linux": (2, 2048),
    "generic": (1, 1024),
}
QEMU = {"libvirt": {"domain_type": "qemu"}}


def spec(**kw: Any) -> dict[str, Variant]:
    sigs = {bool: "b", int: "t", str: "s"}
    return {k: v if isinstance(v, Variant) else Variant(sigs[type(v)], v) for k, v in kw.items()}


async def create(client: Client, **kw: Any) -> tuple[str, str]:
    vm, job = await client.call(MANAGER_PATH, MANAGER, "CreateVM", "a{sv}", [spec(**kw)])
    return vm, job


async def create_fails(client: Client, **kw: Any) -> CallFailed:
    with pytest.raises(CallFailed) as e:
        await create(client, **kw)
    return e.value


async def wait_job(client: Client, job: str, timeout: float = 20.0) -> tuple[str, str]:
    """(State, ErrorName) once the job has ended."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await client.get(job, JOB, "State")
        if state in ("completed", "failed", "cancelled"):
            return state, await client.get(job, JOB, "ErrorName")
        assert asyncio.get_running_loop().time() < deadline, f"job {job} still {state}"
        await asyncio.sleep(0.02)


async def vm_props(client: Client, path: str) -> dict[str, Any]:
    (props,) = await client.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [VM])
    return {k: v.value for k, v in props.items()}


async def managed(client: Client) -> dict[str, Any]:
    (objects,) = await client.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
    return dict(objects)


async def list_vms(client: Client) -> list[Any]:
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    return [list(row) for row in vms]


def files(d: Daemon) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(d.image_dir)), sorted(os.listdir(d.state_dir))


def shm_files(uuid: str = "") -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"looking-glass-{uuid}")]


def uuid_of(path: str) -> str:
    return path.rsplit("/", 1)[1].replace("_", "-")


def removed(client: Client, path: str) -> bool:
    return any(s.member == "InterfacesRemoved" and s.body[0] == path for s in client.signals)


async def created(client: Client, **kw: Any) -> str:
    vm, job = await create(client, **kw)
    assert await wait_job(client, job) == ("completed", "")
    return vm


# ---- each profile ------------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_create_each_profile_and_read_it_back(
    start_daemon: Any, client: Client, profile: str
) -> None:
    d = start_daemon(config=QEMU)
    vm, job = await create(client, name=f"vm-{profile}", profile=profile)
    # The VM object was announced (state creating) before the reply arrived.
    added = [s for s in client.signals if s.member == "InterfacesAdded" and s.body[0] == vm]
    assert added and added[0].body[1][VM]["State"].value == "creating"
    assert added[0].body[1][VM]["StateReason"].value == "create"
    assert await client.get(job, JOB, "Operation") == "create-vm"
    assert await client.get(job, JOB, "Objects") == [vm]
    assert await wait_job(client, job) == ("completed", "")
    assert await client.get(job, JOB, "Progress") == 1.0
    props = await vm_props(client, vm)
    vcpus, memory = PROFILES[profile]
    assert props["Name"] == f"vm-{profile}"
    assert props["UUID"] == uuid_of(vm)
    assert props["State"] == "shutoff"
    assert props["VCPUs"] == vcpus
    assert props["MemoryMiB"] == memory
    assert props["Persistent"] is True
    assert props["Autostart"] is False
    assert props["GPUAddress"] == ""
    assert props["LookingGlass"] is False
    assert props["GuestAgent"] == "disconnected"
    assert [f"vm-{profile}", uuid_of(vm), vm, "shutoff"] in await list_vms(client)
    images, states = files(d)
    assert states == []  # the record is gone once the create completed
    uefi = profile.startswith("windows")
    assert images == ([f"vm-{profile}-{uuid_of(vm)}_VARS.fd"] if uefi else [])


async def test_explicit_keys_override_the_profile(start_daemon: Any, client: Client) -> None:
    start_daemon(config=QEMU)
    vm = await created(
        client, name="big", profile="linux", vcpus=Variant("i", 3), memory_mib=Variant("q", 3000),
        autostart=True,
    )  # fmt: skip
    props = await vm_props(client, vm)
    assert (props["VCPUs"], props["MemoryMiB"], props["Autostart"]) == (3, 3000, True)


@pytest.mark.parametrize("sig", ["y", "n", "q", "i", "u", "x", "t"])
async def test_integer_keys_accept_any_integer_type(
    start_daemon: Any, client: Client, sig: str
) -> None:
    start_daemon(config=QEMU)
    vm = await created(client, name=f"int-{sig}", vcpus=Variant(sig, 2), disk_gib=Variant(sig, 5))
    assert (await vm_props(client, vm))["VCPUs"] == 2


async def test_gdbus_call_sends_i_and_is_accepted(start_daemon: Any, client: Client) -> None:
    from tests.harness import gdbus

    d = start_daemon(config=QEMU)
    out = gdbus(
        d.bus,
        "call", "--system", "--dest", "org.neuronos.Neuron1", "--object-path", MANAGER_PATH,
        "--method", f"{MANAGER}.CreateVM",
        "{'name': <'from-gdbus'>, 'memory_mib': <2048>, 'vcpus': <2>}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "/org/neuronos/Neuron1/vm/" in out.stdout and "/org/neuronos/Neuron1/job/" in out.stdout


# ---- names -------------------------------------------------------------------------------


async def test_twenty_concurrent_creates_all_succeed(start_daemon: Any, client: Client) -> None:
    start_daemon(config={**QEMU, "limits": {"jobs_per_sender": 32}})
    names = [f"par-{i:02d}" for i in range(20)]
    # 1 GiB disks: the test driver's pool pretends to have about 100 GiB
    replies = await asyncio.gather(*(create(client, name=n, disk_gib=1) for n in names))
    results = await asyncio.gather(*(wait_job(client, job) for _, job in replies))
    messages = [await client.get(job, JOB, "ErrorMessage") for _, job in replies]
    assert results == [("completed", "")] * 20, [m for m in messages if m]
    assert len({vm for vm, _ in replies}) == 20
    listed = {row[0]: row[3] for row in await list_vms(client)}
    assert all(listed[n] == "shutoff" for n in names)


async def test_same_name_twice_is_vm_already_exists(start_daemon: Any, client: Client) -> None:
    start_daemon(config=QEMU, extra_args=HOOKS, env={"NEUROND_FAULTS": "create.define:delay:0.5"})
    _, job = await create(client, name="twin")
    # while the first is still being created …
    assert (await create_fails(client, name="twin")).name == ERR + "VMAlreadyExists"
    assert await wait_job(client, job) == ("completed", "")
    # … and once it exists; also against the test driver's own domain
    assert (await create_fails(client, name="twin")).name == ERR + "VMAlreadyExists"
    assert (await create_fails(client, name="test")).name == ERR + "VMAlreadyExists"


# ---- hostile specs -----------------------------------------------------------------------

HOSTILE: list[dict[str, Any]] = [
    {"name": "a/b"},
    {"name": "a'b"},
    {"name": 'a"b'},
    {"name": "$(reboot)"},
    {"name": "a b"},
    {"name": "x" * 65},
    {"name": ""},
    {"name": "-lead"},
    {"name": "<x/>"},
    {"name": "ok\n"},
    {},  # no name
    {"name": "ok", "vcpus": Variant("i", -1)},
    {"name": "ok", "vcpus": Variant("x", -5)},
    {"name": "ok", "vcpus": 0},
    {"name": "ok", "vcpus": 100000},
    {"name": "ok", "memory_mib": 2**63},
    {"name": "ok", "memory_mib": Variant("n", -1)},
    {"name": "ok", "disk_gib": 0},
    {"name": "ok", "disk_gib": 2**40},
    {"name": "ok", "profile": "windows12"},
    {"name": "ok", "vcpus": "4"},
    {"name": "ok", "vcpus": True},
    {"name": "ok", "memory_mib": Variant("d", 2048.0)},
    {"name": "ok", "uefi": Variant("i", 1)},
    {"name": "ok", "name2": "x"},
    {"name": Variant("as", ["ok"])},
    {"name": "ok", "iso": "relative.iso"},
    {"name": "ok", "iso": "/etc/passwd"},
    {"name": "ok", "iso": "/tmp/../etc/passwd"},
    {"name": "ok", "kernel": "/proc/self/exe"},
    {"name": "ok", "initrd": "/nonexistent"},
    {"name": "ok", "gpu": "0000:01:00.0/../.."},
    {"name": "ok", "gpu": "1:0.0"},
    {"name": "ok", "looking_glass_resolution": "1920*1080"},
    {"name": "ok", "looking_glass_resolution": "99999x99999"},
    {"name": "ok", "looking_glass_resolution": "0x0"},
    {"name": "ok", "cmdline": "console=ttyS0\x1b[31m", "kernel": "/x"},
    {"name": "ok", "cmdline": "quiet"},  # a cmdline without a kernel
    {"name": "ok", "profile": "windows11", "tpm": False},
    {"name": "ok", "profile": "windows11", "secure_boot": False},
    {"name": "ok", "profile": "linux", "secure_boot": True},  # secure boot without UEFI
]


@pytest.mark.parametrize("bad", HOSTILE, ids=[repr(h)[:50] for h in HOSTILE])
async def test_hostile_specs_are_invalid_argument_and_change_nothing(
    start_daemon: Any, client: Client, bad: dict[str, Any]
) -> None:
    d = start_daemon(config=QEMU)
    before = await managed(client)
    err = await create_fails(client, **bad)
    assert err.name == ERR + "InvalidArgument", err
    assert await managed(client) == before
    assert files(d) == ([], [])


async def test_the_bad_key_is_named(start_daemon: Any, client: Client) -> None:
    start_daemon(config=QEMU)
    cases = [("vcpus", Variant("s", "4")), ("memory_mib", Variant("t", 1)),
             ("surprise", Variant("b", True)), ("profile", Variant("s", "beos"))]  # fmt: skip
    for key, value in cases:
        err = await create_fails(client, name="named", **{key: value})
        assert repr(key) in err.text, err.text


async def test_paths_confined_to_iso_roots_through_symlinks(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    root = tmp_path / "isos"
    root.mkdir()
    (root / "good.iso").write_bytes(b"\0" * 4096)
    (tmp_path / "secret.iso").write_bytes(b"secret")
    (root / "escape.iso").symlink_to(tmp_path / "secret.iso")
    (root / "dir").symlink_to(tmp_path)
    (root / "inside-link.iso").symlink_to(root / "good.iso")
    d = start_daemon(config={**QEMU, "storage": {"iso_roots": [str(root)]}})
    for bad in (str(root / "escape.iso"), str(root / "dir" / "secret.iso"), str(root),
                str(root / "nothing.iso"), f"{root}/../secret.iso"):  # fmt: skip
        err = await create_fails(client, name="iso", iso=bad)
        assert err.name == ERR + "InvalidArgument", (bad, err)
    assert files(d) == ([], [])
    await created(client, name="iso1", iso=str(root / "good.iso"))
    await created(client, name="iso2", iso=str(root / "inside-link.iso"))



async def test_a_new_vm_shows_its_install_media_from_its_announcement(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    """Media is the install ISO already in InterfacesAdded (state creating), and the create
    completing changes nothing about it: no PropertiesChanged carries Media."""
    root = tmp_path / "isos"
    root.mkdir()
    (root / "install.iso").write_bytes(b"\0" * 4096)
    start_daemon(config={**QEMU, "storage": {"iso_roots": [str(root)]}})
    vm = await created(client, name="with-iso", iso=str(root / "install.iso"))
    added = [s for s in client.signals if s.member == "InterfacesAdded" and s.body[0] == vm]
    assert added[0].body[1][VM]["Media"].value == str(root / "install.iso")
    assert await client.get(vm, VM, "Media") == str(root / "install.iso")
    assert [c for c in client.changes(vm) if "Media" in c] == []

# ---- hardware ----------------------------------------------------------------------------


def hardware(name: str) -> dict[str, Any]:
    sys_root, proc = expected.roots(name)
    return {"hardware": {"sysfs_root": str(sys_root), "procfs_root": str(proc)}}


async def test_gpu_with_iommu_off_is_iommu_error_before_anything(
    start_daemon: Any, client: Client
) -> None:
    d = start_daemon(config={**QEMU, **hardware("iommu-off")})
    before = await managed(client)
    err = await create_fails(client, name="gpu", gpu="0000:01:00.0", looking_glass=True)
    assert err.name == ERR + "IOMMUError"
    assert "intel_iommu=on" in err.text
    assert await managed(client) == before
    assert files(d) == ([], [])


async def test_gpu_not_ready_or_absent_is_gpu_not_found(start_daemon: Any, client: Client) -> None:
    start_daemon(config={**QEMU, **hardware("desktop-navi10")})
    for address in ("0000:30:00.0", "0000:0a:00.0"):  # the boot display; no such device
        assert (await create_fails(client, name="gpu", gpu=address)).name == ERR + "GPUNotFound"


async def test_gpu_and_looking_glass(start_daemon: Any, client: Client) -> None:
    d = start_daemon(config={**QEMU, **hardware("desktop-navi10")})
    vm = await created(client, name="gaming", profile="windows11", gpu="0000:03:00.0",
                       looking_glass=True, looking_glass_resolution="2560x1440")  # fmt: skip
    props = await vm_props(client, vm)
    assert (props["GPUAddress"], props["LookingGlass"]) == ("0000:03:00.0", True)
    uuid = uuid_of(vm)
    shm = Path(f"/dev/shm/looking-glass-{uuid}")
    try:
        # 2560·1440·8 B = 28.1 MiB, + 10 → 64 MiB
        assert shm.stat().st_size == 64 * 2**20
        job = await delete(client, vm)
        assert await wait_job(client, job) == ("completed", "")
        assert not shm.exists()
        assert files(d) == ([], [])
    finally:
        shm.unlink(missing_ok=True)


# ---- failures and cancel -----------------------------------------------------------------

STEPS = ["record", "volume", "nvram", "shm", "define", "autostart", "finish"]


@pytest.mark.parametrize("step", STEPS)
async def test_a_failing_step_rolls_everything_back(
    start_daemon: Any, client: Client, step: str
) -> None:
    d = start_daemon(
        config=QEMU, extra_args=HOOKS, env={"NEUROND_FAULTS": f"create.{step}:libvirt"}
    )
    before = await list_vms(client)
    vm, job = await create(
        client, name="doomed", profile="windows11", looking_glass=True, autostart=True
    )
    state, error = await wait_job(client, job)
    assert (state, error) == ("failed", ERR + "VMCreationFailed")
    await client.wait_for(lambda: removed(client, vm))
    # API.md: a failed create removes the VM after its job ends.
    order = [(s.member, s.path, s.body[0] if s.body else None) for s in client.signals]
    assert order.index(("Completed", job, False)) < order.index(("InterfacesRemoved", ROOT, vm))
    assert vm not in await managed(client)
    assert await list_vms(client) == before
    assert files(d) == ([], [])
    assert shm_files(uuid_of(vm)) == []
    assert (await create_fails(client, name="test")).name == ERR + "VMAlreadyExists"


async def test_cancel_rolls_back(start_daemon: Any, client: Client) -> None:
    d = start_daemon(
        config=QEMU, extra_args=HOOKS, env={"NEUROND_FAULTS": "create.autostart:delay:1"}
    )
    vm, job = await create(client, name="cancelled", profile="windows11", autostart=True,
                           looking_glass=True)  # fmt: skip
    await client.wait_for(lambda: bool(files(d)[0]))  # NVRAM written: mid-create
    assert (await vm_props(client, vm))["State"] == "creating"
    # nothing else may act on a VM being created
    with pytest.raises(CallFailed) as e:
        await client.call(vm, VM, "Start", "a{sv}", [{}])
    assert e.value.name == ERR + "InvalidState"
    await client.call(job, JOB, "Cancel")
    assert await wait_job(client, job) == ("cancelled", ERR + "Cancelled")
    await client.wait_for(lambda: removed(client, vm))
    assert files(d) == ([], [])
    assert shm_files(uuid_of(vm)) == []
    # the name is free again
    await created(client, name="cancelled")


async def test_leftover_records_are_rolled_back_at_start(
    start_daemon: Any, client: Client, private_bus: Any
) -> None:
    d = Daemon(private_bus, config=QEMU)
    uuid = "0b4d1c5e-1111-4222-8333-944455556666"
    nvram = d.image_dir / f"half-{uuid}_VARS.fd"
    nvram.write_bytes(b"vars")
    shm = Path(f"/dev/shm/looking-glass-{uuid}")
    shm.write_bytes(b"")
    (d.image_dir / "someone-elses.qcow2").write_bytes(b"keep")
    (d.state_dir / "unrelated.json").write_text("{}")
    record = {
        "uuid": uuid, "name": "half", "pool_dir": str(d.image_dir),
        "volume": f"half-{uuid}.qcow2", "capacity_gib": 1, "nvram": str(nvram),
        "nvram_template": "/usr/share/OVMF/OVMF_VARS_4M.fd", "shm": str(shm), "shm_mib": 32,
        "xml": "", "autostart": False, "done": ["volume", "nvram"],
    }  # fmt: skip
    (d.state_dir / f"create-{uuid}.json").write_text(json.dumps(record))
    try:
        d.start()
        assert not nvram.exists()
        assert not shm.exists()
        assert files(d) == (["someone-elses.qcow2"], ["unrelated.json"])
    finally:
        d.close()
        shm.unlink(missing_ok=True)


# ---- delete ------------------------------------------------------------------------------


async def delete(client: Client, vm: str, **options: Any) -> str:
    (job,) = await client.call(vm, VM, "Delete", "a{sv}", [spec(**options)])
    return str(job)


@pytest.mark.parametrize("storage", [False, True])
async def test_delete_with_and_without_storage(
    start_daemon: Any, client: Client, storage: bool
) -> None:
    d = start_daemon(config=QEMU)
    vm = await created(client, name="gone", profile="windows11")
    assert files(d)[0]  # its NVRAM
    job = await delete(client, vm, delete_storage=storage)
    assert await client.get(job, JOB, "Operation") == "delete-vm"
    changes = client.changes(vm)
    assert {"State": "deleting", "StateReason": "delete"} in [
        {k: c[k] for k in ("State", "StateReason") if k in c} for c in changes
    ]
    assert await wait_job(client, job) == ("completed", "")
    await client.wait_for(lambda: removed(client, vm))
    assert "gone" not in [row[0] for row in await list_vms(client)]
    assert files(d) == ([], [])
    with pytest.raises(CallFailed) as e:
        await client.get(vm, VM, "State")
    assert e.value.name == "org.freedesktop.DBus.Error.UnknownObject"


async def test_delete_refuses_a_running_vm_unless_forced(start_daemon: Any, client: Client) -> None:
    start_daemon(config=QEMU)
    with pytest.raises(CallFailed) as e:
        await delete(client, TEST_PATH)
    assert e.value.name == ERR + "InvalidState"
    assert "running" in e.value.text
    assert await client.get(TEST_PATH, VM, "State") == "running"
    job = await delete(client, TEST_PATH, force=True)
    assert await wait_job(client, job) == ("completed", "")
    assert "test" not in [row[0] for row in await list_vms(client)]


async def test_identical_delete_joins(start_daemon: Any, client: Client) -> None:
    start_daemon(config=QEMU, extra_args=HOOKS, env={"NEUROND_FAULTS": "virt.delete:delay:0.5"})
    vm = await created(client, name="joined")
    first, second = await asyncio.gather(delete(client, vm), delete(client, vm))
    assert first == second
    assert await client.get(vm, VM, "State") == "deleting"
    # a different call meanwhile is refused
    with pytest.raises(CallFailed) as e:
        await client.call(vm, VM, "SetAutostart", "b", [True])
    assert e.value.name == ERR + "InvalidState"
    assert await wait_job(client, first) == ("completed", "")


async def test_delete_options_are_checked(start_daemon: Any, client: Client) -> None:
    start_daemon(config=QEMU)
    vm = await created(client, name="opts")
    for bad in ({"force": Variant("s", "yes")}, {"wipe": Variant("b", True)}):
        with pytest.raises(CallFailed) as e:
            await client.call(vm, VM, "Delete", "a{sv}", [bad])
        assert e.value.name == ERR + "InvalidArgument"
    assert await client.get(vm, VM, "State") == "shutoff"
