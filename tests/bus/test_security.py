"""Authorization through the public interface: a non-root caller on the system bus.

The first-form authorizer (polkit off): only uid 0 may call the methods that need a polkit
action; reads are open to every local user. The non-root caller is uid 65534 running gdbus or
busctl (the project's venv python cannot run as nobody: /root is 0700); gdbus prints the error
name as ``GDBus.Error:<name>: <message>``. Every refusal is checked to have changed nothing.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from neurond.bus.service import ACTIONS
from tests.bus.conftest import (
    ERR,
    MANAGER,
    MANAGER_PATH,
    NAME,
    ROOT,
    TEST_PATH,
    TEST_UUID,
    VM,
    VM_METHOD_ARGS,
    Client,
    gdbus_error,
)
from tests.harness import Daemon, PrivateBus, busctl, gdbus

PERMISSION_DENIED = ERR + "PermissionDenied"


def call(
    bus: PrivateBus, path: str, iface: str, member: str, *args: str, as_nobody: bool
) -> subprocess.CompletedProcess[str]:
    return gdbus(
        bus, "call", "--dest", NAME, "--object-path", path, "--method", f"{iface}.{member}",
        *args, as_nobody=as_nobody, timeout=15,
    )  # fmt: skip


async def vm_snapshot(client: Client) -> dict[str, object]:
    """What a refused call must leave alone: the VM's properties and the job list."""
    (props,) = await client.call(TEST_PATH, "org.freedesktop.DBus.Properties", "GetAll", "s", [VM])
    (jobs,) = await client.call(MANAGER_PATH, MANAGER, "ListJobs")
    return {"props": {k: v.value for k, v in props.items()}, "jobs": sorted(jobs)}


def test_every_action_method_is_covered_here() -> None:
    """A VM method that gains a polkit action must be added to the refusal tests below."""
    guarded = {member for (iface, member) in ACTIONS if iface == VM}
    assert guarded == set(VM_METHOD_ARGS), (
        f"VM methods with an action: {sorted(guarded)}; tested here: {sorted(VM_METHOD_ARGS)}"
    )


async def test_nobody_is_refused_every_action_method_and_nothing_changes(
    private_bus: PrivateBus, daemon: Daemon, client: Client
) -> None:
    before = await vm_snapshot(client)
    assert before["props"]["State"] == "running", before  # Pause, Shutdown, … would act
    failures = []
    for method, args in VM_METHOD_ARGS.items():
        out = call(private_bus, TEST_PATH, VM, method, *args, as_nobody=True)
        if out.returncode == 0:
            failures.append(f"{method}: succeeded for nobody: {out.stdout.strip()}")
        elif gdbus_error(out.stderr) != PERMISSION_DENIED:
            failures.append(f"{method}: {out.stderr.strip()}")
        # The message is for a person: it names who was refused what.
        elif "65534" not in out.stderr or "org.neuronos.neuron1." not in out.stderr:
            failures.append(f"{method}: message names neither uid nor action: {out.stderr}")
        after = await vm_snapshot(client)
        if after != before:
            failures.append(f"{method}: refused, yet the VM or the jobs changed: {after}")
    assert not failures, "\n".join(failures)
    assert daemon.proc is not None and daemon.proc.poll() is None


async def test_nobody_is_refused_through_busctl_too(
    private_bus: PrivateBus, daemon: Daemon, client: Client
) -> None:
    """sd-bus clients get the same refusal (busctl prints only the message)."""
    before = await vm_snapshot(client)
    out = busctl(private_bus, "call", NAME, TEST_PATH, VM, "Pause", as_nobody=True)
    assert out.returncode != 0, out.stdout
    assert "not allowed" in out.stderr, out.stderr
    assert await vm_snapshot(client) == before


async def test_root_may_call_every_lifecycle_method(
    private_bus: PrivateBus, daemon: Daemon, client: Client
) -> None:
    """The same gdbus calls succeed for uid 0: the refusal above is about the uid, not the tool."""

    async def state() -> str:
        value = await client.get(TEST_PATH, VM, "State")
        assert isinstance(value, str)
        return value

    async def run(method: str, expect_state: str) -> subprocess.CompletedProcess[str]:
        out = call(private_bus, TEST_PATH, VM, method, *VM_METHOD_ARGS[method], as_nobody=False)
        assert out.returncode == 0, f"{method} as root: {out.stderr}"
        for _ in range(200):  # a Shutdown job ends shortly after its reply
            if await state() == expect_state:
                return out
            await asyncio.sleep(0.025)
        raise AssertionError(f"after {method}: State {await state()!r}, want {expect_state!r}")

    await run("Pause", "paused")
    await run("Resume", "running")
    await run("Reboot", "running")
    await run("Reset", "running")
    await run("SetAutostart", "running")
    assert await client.get(TEST_PATH, VM, "Autostart") is True
    shutdown = await run("Shutdown", "shutoff")
    assert "/org/neuronos/Neuron1/job/" in shutdown.stdout, shutdown.stdout
    await run("Start", "running")
    await run("ForceOff", "shutoff")


READS: list[tuple[str, str, str, tuple[str, ...], str]] = [
    # (path, interface, member, gdbus args, text the answer must contain)
    (MANAGER_PATH, MANAGER, "ListVMs", (), TEST_UUID),
    (MANAGER_PATH, MANAGER, "GetVM", ("test",), f"objectpath '{TEST_PATH}'"),
    (MANAGER_PATH, MANAGER, "GetVM", (TEST_UUID,), f"objectpath '{TEST_PATH}'"),
    (MANAGER_PATH, MANAGER, "ListErrors", (), "org.neuronos.Neuron1.Error.PermissionDenied"),
    (MANAGER_PATH, MANAGER, "ListJobs", (), "@ao []"),
    (ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", (), TEST_PATH),
    (TEST_PATH, "org.freedesktop.DBus.Properties", "GetAll", (VM,), "'State': <'running'>"),
    (MANAGER_PATH, "org.freedesktop.DBus.Properties", "GetAll", (MANAGER,), "'APIVersion'"),
    (TEST_PATH, "org.freedesktop.DBus.Properties", "Get", (VM, "Name"), "<'test'>"),
    # gdbus prints the XML in double quotes (it holds an apostrophe), escaping the XML's own
    (TEST_PATH, "org.freedesktop.DBus.Introspectable", "Introspect", (), 'name=\\"' + VM),
    (MANAGER_PATH, "org.freedesktop.DBus.Introspectable", "Introspect", (), 'name=\\"' + MANAGER),
    (TEST_PATH, "org.freedesktop.DBus.Peer", "Ping", (), "()"),
]


@pytest.mark.parametrize("as_nobody", [True, False], ids=["nobody", "root"])
def test_reads_are_open_to_everyone(
    private_bus: PrivateBus, daemon: Daemon, as_nobody: bool
) -> None:
    failures = []
    for path, iface, member, args, expect in READS:
        out = call(private_bus, path, iface, member, *args, as_nobody=as_nobody)
        if out.returncode != 0 or expect not in out.stdout:
            failures.append(
                f"{iface}.{member}{args} at {path}: rc {out.returncode}, "
                f"stderr {out.stderr.strip()!r}, stdout {out.stdout[:300]!r}"
            )
    assert not failures, "\n".join(failures)


def test_nobody_reads_through_busctl(private_bus: PrivateBus, daemon: Daemon) -> None:
    out = busctl(private_bus, "get-property", NAME, TEST_PATH, VM, "State", as_nobody=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 's "running"'
    out = busctl(private_bus, "introspect", NAME, TEST_PATH, as_nobody=True)
    assert out.returncode == 0, out.stderr
    assert ".Pause" in out.stdout and ".State" in out.stdout, out.stdout


async def test_nobody_cannot_cancel_a_job_root_started(
    private_bus: PrivateBus, daemon: Daemon, client: Client
) -> None:
    """Job.Cancel of another uid's job needs cancel-job-other-user: refused for nobody."""
    (job,) = await client.call(TEST_PATH, VM, "Shutdown", "a{sv}", [{}])
    props = "org.freedesktop.DBus.Properties"
    out = call(private_bus, job, "org.neuronos.Neuron1.Job", "Cancel", as_nobody=True)
    assert out.returncode != 0, out.stdout
    assert gdbus_error(out.stderr) == PERMISSION_DENIED, out.stderr
    assert "cancel-job-other-user" in out.stderr, out.stderr
    (after,) = await client.call(job, props, "GetAll", "s", ["org.neuronos.Neuron1.Job"])
    # The refused Cancel did not end the job cancelled (it ran to its own end, or still runs).
    assert after["State"].value != "cancelled", after
    assert after["ErrorName"].value != ERR + "Cancelled", after
