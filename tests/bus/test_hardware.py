"""The Hardware interface through the bus: each fixture tree's answers, hostile addresses,
the gpu-passthrough feature, reads open to every user, and this machine's own sysfs.

neurond runs with ``hardware.sysfs_root``/``procfs_root`` pointing at a fixture tree (or at
the real /sys and /proc). Names come from the system's pci.ids, which may be absent: the
expected names are looked up in the same database the daemon reads.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from neurond.hardware.pciids import PciIds
from tests.bus.conftest import DBUS_ERR, ERR, MANAGER, MANAGER_PATH, NAME, CallFailed, Client
from tests.bus.test_daemon import rewrite_config, wait_for_log
from tests.fixtures.sysfs import expected
from tests.fixtures.sysfs.expected import MACHINES, MALFORMED_NOT_GPUS, check_sentences
from tests.harness import Daemon, PrivateBus, busctl, gdbus

HARDWARE = "org.neuronos.Neuron1.Hardware"
IOMMU_SIGNATURES = {"enabled": "b", "groups": "u", "cpu_vendor": "s", "virtualization": "b",
                    "kernel_param": "s"}  # fmt: skip
GPU_SIGNATURES = {
    "address": "s", "vendor_id": "s", "device_id": "s", "vendor": "s", "name": "s",
    "class": "s", "driver": "s", "iommu_group": "i", "boot_vga": "b", "group_devices": "as",
    "passthrough_ready": "b", "reasons": "as", "warnings": "as",
}  # fmt: skip
HOSTILE = ["../../etc", "0000:01:00.0/../..", "", "x" * 1_000_000, "0000:01:00.0\n",
           "0000:01:00.8", "0000:01:00.0 ", "/sys/bus/pci/devices/0000:01:00.0",
           "0000:01:00.0/", "..", "\uff10000:01:00.0", "0000:01:00.0/driver/unbind",
           "%2e%2e%2f", "\x1b[31m0000:01:00.0"]  # fmt: skip


def hardware_config(name: str) -> dict[str, Any]:
    sys_root, proc = expected.roots(name)
    return {"hardware": {"sysfs_root": str(sys_root), "procfs_root": str(proc)}}


def unwrap(values: dict[str, Variant], signatures: dict[str, str]) -> dict[str, Any]:
    assert {k: v.signature for k, v in values.items()} == signatures
    return {k: v.value for k, v in values.items()}


async def call(client: Client, member: str, *args: str) -> Any:
    (value,) = await client.call(MANAGER_PATH, HARDWARE, member, "s" * len(args), list(args))
    return value


async def failure(client: Client, member: str, *args: str) -> CallFailed:
    with pytest.raises(CallFailed) as e:
        await call(client, member, *args)
    return e.value


def no_traceback(daemon: Daemon) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, "neurond died"
    assert "Traceback" not in daemon.stderr_text()


# ---- the fixture trees ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MACHINES))
async def test_fixture_over_the_bus(
    name: str, start_daemon: Callable[..., Daemon], client: Client
) -> None:
    want = MACHINES[name]
    daemon = start_daemon(config=hardware_config(name))
    status = unwrap(await call(client, "GetIOMMUStatus"), IOMMU_SIGNATURES)
    assert status == want.iommu

    gpus = [unwrap(g, GPU_SIGNATURES) for g in await call(client, "ListGPUs")]
    assert [g["address"] for g in gpus] == [g.address for g in want.gpus]
    names = PciIds().names((g.vendor_id, g.device_id) for g in want.gpus)
    for got, exp in zip(gpus, want.gpus, strict=True):
        vendor, device = names[(exp.vendor_id, exp.device_id)]
        answer = {**expected.gpu_answer(exp), "vendor": vendor, "name": device}
        assert {k: got[k] for k in answer} == answer
        check_sentences(got["reasons"], exp.reasons, f"{exp.address} reasons")
        check_sentences(got["warnings"], exp.warnings, f"{exp.address} warnings")
        for address in (exp.address, exp.address.upper()):
            result = unwrap(await call(client, "CheckPassthrough", address),
                            {"ready": "b", "reasons": "as", "warnings": "as"})  # fmt: skip
            assert result == {"ready": exp.ready, "reasons": got["reasons"],
                              "warnings": got["warnings"]}  # fmt: skip

    assert await client.get(MANAGER_PATH, MANAGER, "Features") == want.features
    (objects,) = await client.call(
        "/org/neuronos/Neuron1", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
    )
    manager = objects[MANAGER_PATH]
    assert manager[MANAGER]["Features"].value == want.features
    assert HARDWARE in manager and manager[HARDWARE] == {}  # no properties
    if name == "malformed":
        for address in MALFORMED_NOT_GPUS:
            err = await failure(client, "CheckPassthrough", address)
            assert err.name == ERR + "GPUNotFound", (address, err)
            assert "Traceback" not in err.text and len(err.text) < 300
    no_traceback(daemon)


async def test_hostile_addresses_are_invalid_arguments(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = start_daemon(config=hardware_config("laptop-optimus"))
    for hostile in HOSTILE:
        err = await failure(client, "CheckPassthrough", hostile)
        assert err.name == ERR + "InvalidArgument", (hostile[:40], err.name)
        assert err.signature == "s" and "DDDD:BB:SS.F" in err.text
        assert len(err.text) < 300 and "\x1b" not in err.text
    # Still serving, and nothing was read outside the tree.
    assert (await call(client, "CheckPassthrough", "0000:01:00.0"))["ready"].value is True
    no_traceback(daemon)


async def test_unknown_and_non_gpu_addresses_are_gpu_not_found(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    start_daemon(config=hardware_config("laptop-optimus"))
    err = await failure(client, "CheckPassthrough", "0000:09:00.0")
    assert err.name == ERR + "GPUNotFound" and "0000:09:00.0" in err.text
    err = await failure(client, "CheckPassthrough", "0000:00:14.0")
    assert err.name == ERR + "GPUNotFound" and "USB controller, not a GPU" in err.text


async def test_wrong_signature_is_invalid_args(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    start_daemon(config=hardware_config("laptop-optimus"))
    with pytest.raises(CallFailed) as e:
        await client.call(MANAGER_PATH, HARDWARE, "CheckPassthrough", "i", [1])
    assert e.value.name == DBUS_ERR + "InvalidArgs"


async def test_features_follow_the_hardware(
    start_daemon: Callable[..., Daemon], client: Client, tmp_path: Path
) -> None:
    """Computed on every read: when the ready GPU goes, so does the feature."""
    tree = tmp_path / "laptop"
    shutil.copytree(expected.HERE / "laptop-optimus", tree, symlinks=True)
    start_daemon(config={"hardware": {"sysfs_root": str(tree / "sys"),
                                      "procfs_root": str(tree / "proc")}})  # fmt: skip
    assert await client.get(MANAGER_PATH, MANAGER, "Features") == ["gpu-passthrough"]
    (tree / "sys/bus/pci/devices/0000:01:00.0").unlink()  # hot-unplugged
    assert await client.get(MANAGER_PATH, MANAGER, "Features") == []
    assert [g["address"].value for g in await call(client, "ListGPUs")] == ["0000:00:02.0"]


async def test_sighup_applies_new_hardware_roots(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(config=hardware_config("iommu-off"))
    assert d.proc is not None
    assert await client.get(MANAGER_PATH, MANAGER, "Features") == []
    rewrite_config(d, **hardware_config("desktop-navi10"))
    d.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_for_log, d, "Configuration reloaded")
    assert (await call(client, "GetIOMMUStatus"))["cpu_vendor"].value == "amd"
    assert await client.get(MANAGER_PATH, MANAGER, "Features") == ["gpu-passthrough"]


def test_reads_are_open_to_every_user(private_bus: PrivateBus, start_daemon: Any) -> None:
    """uid 65534 reads the Hardware interface without polkit (API.md: Hardware is a read)."""
    start_daemon(config=hardware_config("desktop-navi10"))
    out = busctl(private_bus, "call", NAME, MANAGER_PATH, HARDWARE, "CheckPassthrough", "s",
                 "0000:03:00.0", as_nobody=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('a{sv} 3 "ready" b true'), out.stdout
    out = gdbus(private_bus, "call", "--dest", NAME, "--object-path", MANAGER_PATH,
                "--method", f"{HARDWARE}.ListGPUs", as_nobody=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'0000:03:00.0'" in out.stdout and "'0000:30:00.0'" in out.stdout


# ---- this machine --------------------------------------------------------------------------


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def this_machine() -> tuple[dict[str, Any], list[str]]:
    """The IOMMU status and GPU addresses of this host, read here independently of neurond."""
    groups_dir = "/sys/kernel/iommu_groups"
    groups = [g for g in os.listdir(groups_dir) if g.isdigit()] if os.path.isdir(groups_dir) else []
    cpuinfo = read("/proc/cpuinfo").split("\n\n")[0]
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    cpu = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor[1] if vendor else "", "other")
    param = {"intel": "intel_iommu=on", "amd": "amd_iommu=on"}.get(cpu, "")
    status = {
        "enabled": bool(groups), "groups": len(groups), "cpu_vendor": cpu,
        "virtualization": bool(flags and {"vmx", "svm"} & set(flags[1].split())),
        "kernel_param": "" if groups else param,
    }  # fmt: skip
    gpus = sorted(
        d for d in os.listdir("/sys/bus/pci/devices")
        if read(f"/sys/bus/pci/devices/{d}/class").strip()[:6] in ("0x0300", "0x0302", "0x0380")
    )  # fmt: skip
    return status, gpus


async def test_this_machine_is_answered_honestly(daemon: Daemon, client: Client) -> None:
    """The default roots (/sys, /proc): on this VM, whatever it is, the answer matches what
    the test reads itself, and Features offers gpu-passthrough only if a GPU is ready."""
    status, addresses = this_machine()
    assert unwrap(await call(client, "GetIOMMUStatus"), IOMMU_SIGNATURES) == status
    gpus = [unwrap(g, GPU_SIGNATURES) for g in await call(client, "ListGPUs")]
    assert [g["address"] for g in gpus] == addresses
    for g in gpus:
        assert g["passthrough_ready"] == (not g["reasons"])
        if not status["enabled"]:
            assert not g["passthrough_ready"] and status["kernel_param"] in g["reasons"][0]
    ready = any(g["passthrough_ready"] for g in gpus)
    features = await client.get(MANAGER_PATH, MANAGER, "Features")
    assert ("gpu-passthrough" in features) == ready
    # A PCI device of this machine that is not a GPU is GPUNotFound, naming its class.
    others = sorted(set(os.listdir("/sys/bus/pci/devices")) - set(addresses))
    if others:
        err = await failure(client, "CheckPassthrough", others[0])
        assert err.name == ERR + "GPUNotFound" and "not a GPU" in err.text
    no_traceback(daemon)
