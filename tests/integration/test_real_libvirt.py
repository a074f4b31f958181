"""neurond on a real libvirtd (qemu:///system) with the tiny real guest, through D-Bus only.

Issue 3's "Done when": lifecycle methods on a booting Linux guest (ACPI shutdown by the guest's
own power-button watcher, forced shutdown of a guest that ignores ACPI), the guest agent
connecting, changes made with virsh behind neurond's back, and libvirtd killed and restarted.
Guests are software-emulated (`<domain type='qemu'>`): about 6 s from Start to the ready line.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, Variant

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, ROOT, VM, CallFailed, Client
from tests.harness import Daemon
from tests.integration.conftest import (
    GuestDomain,
    LibvirtDaemons,
    MakeDomain,
    define_xml_async,
    virsh,
    virsh_list_all,
)

JOB = "org.neuronos.Neuron1.Job"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
StartNeurond = Callable[..., Daemon]

# How long after a change made with virsh neurond may take to show it (issue 3).
OUTSIDE_CHANGE_S = 1.0
# SIGKILL closes libvirtd's socket at once; a hung libvirtd is noticed by the keepalive
# (2 s, 3 times, in neurond.virt.backend), so 10 s covers both with margin.
DISCONNECT_NOTICED_S = 10.0
# A call while disconnected must fail at once, not wait for a timeout.
FAIL_FAST_S = 1.0


# -- helpers ---------------------------------------------------------------------------------


def mark(client: Client) -> int:
    """A position in the client's signal record: later helpers look only at what follows."""
    return len(client.signals)


def changes(client: Client, path: str, since: int = 0) -> list[dict[str, Any]]:
    return [
        {k: v.value for k, v in m.body[1].items()}
        for m in client.signals[since:]
        if m.member == "PropertiesChanged" and m.path == path
    ]


def state_changes(client: Client, path: str, since: int = 0) -> list[tuple[str, str]]:
    """(State, StateReason) of each PropertiesChanged that moved the state."""
    out = []
    for c in changes(client, path, since):
        if "State" in c or "StateReason" in c:
            # API.md: a state change is one PropertiesChanged carrying both.
            assert "State" in c and "StateReason" in c, f"state change split in two: {c}"
            out.append((c["State"], c["StateReason"]))
    return out


def object_signals(path: str) -> tuple[Callable[[Message], bool], Callable[[Message], bool]]:
    """wait_signal predicates: InterfacesAdded and InterfacesRemoved of the object ``path``."""

    def of(member: str) -> Callable[[Message], bool]:
        return lambda m: m.member == member and m.path == ROOT and m.body[0] == path

    return of("InterfacesAdded"), of("InterfacesRemoved")


async def wait_signal(
    client: Client, pred: Callable[[Message], bool], since: int, timeout: float, what: str
) -> tuple[Message, float]:
    """The first signal after ``since`` matching ``pred``, and how long the wait took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        for msg in client.signals[since:]:
            if pred(msg):
                return msg, loop.time() - started
        if loop.time() - started > timeout:
            seen = [(m.path, m.member, m.body) for m in client.signals[since:]]
            raise AssertionError(f"no {what} within {timeout} s; signals since: {seen}")
        await asyncio.sleep(0.005)


async def wait_state(
    client: Client, path: str, state: str, reason: str, since: int, timeout: float
) -> float:
    """Wait for a PropertiesChanged carrying State=state and StateReason=reason."""

    def pred(m: Message) -> bool:
        if m.member != "PropertiesChanged" or m.path != path or m.body[0] != VM:
            return False
        props = m.body[1]
        return (
            "State" in props
            and props["State"].value == state
            and "StateReason" in props
            and props["StateReason"].value == reason
        )

    _, took = await wait_signal(client, pred, since, timeout, f"State {state}/{reason} on {path}")
    return took


async def virsh_pause_and_resume(
    client: Client,
    path: str,
    name: str,
    then: Callable[[str, str], Awaitable[None]] | None = None,
) -> None:
    """virsh suspend, then resume: each seen as exactly one state change, nothing after it;
    ``then(state, reason)`` after each."""
    for command, state, reason in [
        ("suspend", "paused", "user"),
        ("resume", "running", "unpaused"),
    ]:
        since = mark(client)
        await virsh(command, name)
        await wait_state(client, path, state, reason, since, OUTSIDE_CHANGE_S)
        await asyncio.sleep(0.3)  # anything else that follows would show now
        assert state_changes(client, path, since) == [(state, reason)], command
        if then is not None:
            await then(state, reason)


async def wait_connected(client: Client, value: bool, since: int, timeout: float) -> float:
    def pred(m: Message) -> bool:
        return (
            m.member == "PropertiesChanged"
            and m.path == MANAGER_PATH
            and "Connected" in m.body[1]
            and m.body[1]["Connected"].value is value
        )

    _, took = await wait_signal(client, pred, since, timeout, f"Connected={value}")
    return took


async def vm_state(client: Client, path: str) -> tuple[str, str]:
    return (await client.get(path, VM, "State"), await client.get(path, VM, "StateReason"))


async def call_vm(client: Client, dom: GuestDomain, member: str, *args: Any) -> list[Any]:
    signature = {"Start": "a{sv}", "Shutdown": "a{sv}"}.get(member, "")
    return await client.call(dom.path, VM, member, signature, list(args))


async def shutdown_job(client: Client, dom: GuestDomain, **options: Variant) -> str:
    (job,) = await call_vm(client, dom, "Shutdown", dict(options))
    assert job.startswith(f"{ROOT}/job/"), job
    return str(job)


async def wait_job(client: Client, job: str, since: int, timeout: float) -> tuple[list[Any], float]:
    """The body of the job's Completed signal (success, error_name, message); seconds waited."""

    def pred(m: Message) -> bool:
        return m.member == "Completed" and m.path == job and m.interface == JOB

    msg, took = await wait_signal(client, pred, since, timeout, f"Completed of {job}")
    return list(msg.body), took


async def list_vms(client: Client) -> dict[str, str]:
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    return {name: state for name, _uuid, _path, state in vms}


async def expect_error(name: str, coro: Any) -> tuple[CallFailed, float]:
    started = time.monotonic()
    try:
        await coro
    except CallFailed as e:
        took = time.monotonic() - started
        assert e.name == ERR + name, f"expected {name}, got {e.name}: {e.text}"
        return e, took
    raise AssertionError(f"the call succeeded; expected {ERR}{name}")


async def start_and_boot(client: Client, dom: GuestDomain) -> None:
    """Start through neurond and wait until the guest's watcher (and agent) run."""
    await call_vm(client, dom, "Start", {})
    assert await vm_state(client, dom.path) == ("running", "booted")
    await dom.wait_ready()


# -- lifecycle through neurond ---------------------------------------------------------------


async def test_start_pause_resume_and_acpi_shutdown(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains()
    neurond()
    assert await vm_state(client, dom.path) == ("shutoff", "unknown")
    assert await client.get(dom.path, VM, "GuestAgent") == "none"

    since = mark(client)
    await call_vm(client, dom, "Start", {})
    # The reply comes once libvirt's state is read: running/booted already.
    assert await vm_state(client, dom.path) == ("running", "booted")
    await wait_state(client, dom.path, "running", "booted", since, 1.0)
    assert state_changes(client, dom.path, since) == [("starting", "start"), ("running", "booted")]
    boot_s = await dom.wait_ready()
    print(f"guest ready {boot_s:.1f} s after Start")

    since = mark(client)
    await call_vm(client, dom, "Pause")
    assert await vm_state(client, dom.path) == ("paused", "user")
    assert (await virsh("domstate", "--reason", dom.name)).strip() == "paused (user)"
    await call_vm(client, dom, "Resume")
    assert await vm_state(client, dom.path) == ("running", "unpaused")
    assert (await virsh("domstate", "--reason", dom.name)).strip() == "running (unpaused)"
    assert state_changes(client, dom.path, since) == [("paused", "user"), ("running", "unpaused")]

    since = mark(client)
    job = await shutdown_job(client, dom)
    assert await client.get(job, JOB, "Operation") == "shutdown-vm"
    (success, error_name, message), took = await wait_job(client, job, since, 30.0)
    print(f"ACPI shutdown took {took:.1f} s")
    assert (success, error_name) == (True, ""), message
    assert await client.get(job, JOB, "State") == "completed"
    assert await vm_state(client, dom.path) == ("shutoff", "shutdown")
    assert (await virsh("domstate", "--reason", dom.name)).strip() == "shut off (shutdown)"
    # The guest powered itself off on the ACPI button: not a destroy after a timeout.
    assert "NRDTEST-POWERBUTTON" in dom.serial_text()
    assert state_changes(client, dom.path, since) == [
        ("stopping", "shutdown"),
        ("shutoff", "shutdown"),
    ]


async def test_force_off(neurond: StartNeurond, client: Client, domains: MakeDomain) -> None:
    dom = domains()
    neurond()
    await call_vm(client, dom, "Start", {})
    assert await vm_state(client, dom.path) == ("running", "booted")

    since = mark(client)
    await call_vm(client, dom, "ForceOff")
    assert await vm_state(client, dom.path) == ("shutoff", "destroyed")
    assert (await virsh("domstate", "--reason", dom.name)).strip() == "shut off (destroyed)"
    assert state_changes(client, dom.path, since) == [("shutoff", "destroyed")]


async def test_guest_agent_connects_after_boot(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(agent=True)
    neurond()
    assert await client.get(dom.path, VM, "GuestAgent") == "disconnected"

    since = mark(client)
    await call_vm(client, dom, "Start", {})
    assert await client.get(dom.path, VM, "GuestAgent") == "disconnected"

    def agent_is(value: str) -> Callable[[Message], bool]:
        def pred(m: Message) -> bool:
            return (
                m.member == "PropertiesChanged"
                and m.path == dom.path
                and "GuestAgent" in m.body[1]
                and m.body[1]["GuestAgent"].value == value
            )

        return pred

    _, took = await wait_signal(client, agent_is("connected"), since, 90.0, "GuestAgent=connected")
    print(f"agent connected {took:.1f} s after Start")
    assert "agent=on" in dom.serial_text()
    assert await client.get(dom.path, VM, "GuestAgent") == "connected"
    agent_changes = [c["GuestAgent"] for c in changes(client, dom.path, since) if "GuestAgent" in c]
    assert agent_changes == ["connected"]

    since = mark(client)
    await call_vm(client, dom, "ForceOff")
    await wait_signal(client, agent_is("disconnected"), since, 5.0, "GuestAgent=disconnected")
    assert await client.get(dom.path, VM, "GuestAgent") == "disconnected"


async def test_shutdown_without_force_times_out_and_vm_keeps_running(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(ignore_acpi=True)
    neurond()
    await start_and_boot(client, dom)
    assert "acpi=ignore" in dom.serial_text()

    since = mark(client)
    job = await shutdown_job(client, dom, timeout_s=Variant("u", 2))
    assert await vm_state(client, dom.path) == ("stopping", "shutdown")
    (success, error_name, message), took = await wait_job(client, job, since, 15.0)
    assert (success, error_name) == (False, ERR + "Timeout"), message
    assert took >= 1.9, f"the job failed after {took:.2f} s, before its 2 s timeout"
    assert await client.get(job, JOB, "State") == "failed"
    assert await client.get(job, JOB, "ErrorName") == ERR + "Timeout"
    # The VM keeps running; libvirt says so too.
    assert await vm_state(client, dom.path) == ("running", "booted")
    assert (await virsh("domstate", dom.name)).strip() == "running"
    assert state_changes(client, dom.path, since)[-1] == ("running", "booted")
    assert "NRDTEST-POWERBUTTON" not in dom.serial_text()


async def test_shutdown_force_destroys_a_guest_ignoring_acpi_after_the_timeout(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(ignore_acpi=True)
    neurond()
    await start_and_boot(client, dom)

    since = mark(client)
    job = await shutdown_job(client, dom, force=Variant("b", True), timeout_s=Variant("u", 2))
    (success, error_name, message), took = await wait_job(client, job, since, 15.0)
    assert (success, error_name) == (True, ""), message
    assert took >= 1.9, f"the job ended after {took:.2f} s, before its 2 s timeout"
    assert await client.get(job, JOB, "State") == "completed"
    assert await vm_state(client, dom.path) == ("shutoff", "destroyed")
    assert (await virsh("domstate", "--reason", dom.name)).strip() == "shut off (destroyed)"
    assert state_changes(client, dom.path, since) == [
        ("stopping", "shutdown"),
        ("shutoff", "destroyed"),
    ]


async def test_force_off_during_a_shutdown_job_cancels_it_and_moves_the_state_once(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(ignore_acpi=True)
    neurond()
    await start_and_boot(client, dom)

    since = mark(client)
    job = await shutdown_job(client, dom)
    assert await vm_state(client, dom.path) == ("stopping", "shutdown")
    await call_vm(client, dom, "ForceOff")
    (success, error_name, _message), _ = await wait_job(client, job, since, 10.0)
    assert (success, error_name) == (False, ERR + "Cancelled")
    assert await client.get(job, JOB, "State") == "cancelled"
    assert await vm_state(client, dom.path) == ("shutoff", "destroyed")
    # API.md: ForceOff goes from stopping to shutoff (destroyed); nothing in between.
    assert state_changes(client, dom.path, since) == [
        ("stopping", "shutdown"),
        ("shutoff", "destroyed"),
    ]


# -- changes made behind neurond's back ------------------------------------------------------


async def test_virsh_changes_are_seen_on_the_bus_within_a_second(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(define=False)
    neurond()

    added, removed = object_signals(dom.path)

    since = mark(client)
    await define_xml_async(dom.xml)
    msg, _ = await wait_signal(client, added, since, OUTSIDE_CHANGE_S, "InterfacesAdded")
    props = msg.body[1][VM]
    assert props["Name"].value == dom.name
    assert (props["State"].value, props["StateReason"].value) == ("shutoff", "unknown")

    since = mark(client)
    await virsh("start", dom.name)
    await wait_state(client, dom.path, "running", "booted", since, OUTSIDE_CHANGE_S)
    await dom.wait_ready()
    assert state_changes(client, dom.path, since) == [("running", "booted")]

    await virsh_pause_and_resume(client, dom.path, dom.name)

    since = mark(client)
    await virsh("shutdown", "--mode", "acpi", dom.name)
    await wait_state(client, dom.path, "shutoff", "shutdown", since, 15.0)
    assert "NRDTEST-POWERBUTTON" in dom.serial_text()
    assert state_changes(client, dom.path, since)[-1] == ("shutoff", "shutdown")

    since = mark(client)
    await virsh("start", dom.name)
    await wait_state(client, dom.path, "running", "booted", since, OUTSIDE_CHANGE_S)
    since = mark(client)
    await virsh("destroy", dom.name)
    await wait_state(client, dom.path, "shutoff", "destroyed", since, OUTSIDE_CHANGE_S)
    await asyncio.sleep(0.3)
    changes = state_changes(client, dom.path, since)
    # libvirt itself may show the domain as "shutdown" (our stopping) for a moment: QEMU
    # reports SHUTDOWN on the SIGTERM of a destroy before libvirt reaps it; a read landing
    # there is the truth of that moment (seen under load), so at most that one step first.
    assert changes[-1] == ("shutoff", "destroyed"), changes
    assert changes[:-1] in ([], [("stopping", "unknown")]), changes

    since = mark(client)
    await virsh("undefine", dom.name)
    msg, _ = await wait_signal(client, removed, since, OUTSIDE_CHANGE_S, "InterfacesRemoved")
    assert VM in msg.body[1]
    await expect_error("VMNotFound", client.call(MANAGER_PATH, MANAGER, "GetVM", "s", [dom.name]))
    try:
        await client.get(dom.path, VM, "State")
    except CallFailed as e:
        assert e.name == UNKNOWN_OBJECT, e
    else:
        raise AssertionError("the removed VM's object still answers")


async def test_virsh_redefine_rename_and_transient_domains(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains()
    transient = domains(define=False)
    neurond()

    # Redefined with more memory: the property follows.
    root = ET.fromstring(dom.xml)
    memory = root.find("memory")
    assert memory is not None
    memory.text = "512"
    since = mark(client)
    await define_xml_async(ET.tostring(root, encoding="unicode"))

    def memory_changed(m: Message) -> bool:
        return (
            m.member == "PropertiesChanged"
            and m.path == dom.path
            and m.body[1].get("MemoryMiB", Variant("t", 0)).value == 512
        )

    await wait_signal(client, memory_changed, since, OUTSIDE_CHANGE_S, "MemoryMiB=512")

    # Renamed: same object path (API.md: a path survives a rename), new Name.
    old_name, new_name = dom.name, dom.name + "-renamed"
    since = mark(client)
    await virsh("domrename", old_name, new_name)
    dom.name = new_name  # for the teardown

    def renamed(m: Message) -> bool:
        return (
            m.member == "PropertiesChanged"
            and m.path == dom.path
            and m.body[1].get("Name", Variant("s", "")).value == new_name
        )

    await wait_signal(client, renamed, since, OUTSIDE_CHANGE_S, f"Name={new_name}")
    await asyncio.sleep(0.3)
    assert [m.member for m in client.signals[since:] if m.path == ROOT] == [], (
        "a rename must not remove and re-add the VM"
    )
    assert await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", [new_name]) == [dom.path]
    await expect_error("VMNotFound", client.call(MANAGER_PATH, MANAGER, "GetVM", "s", [old_name]))

    # A transient domain started with `virsh create` appears running and goes when destroyed.
    added, removed = object_signals(transient.path)

    since = mark(client)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="nrdtest-") as f:
        f.write(transient.xml)
        f.flush()
        await virsh("create", f.name)
    msg, _ = await wait_signal(client, added, since, OUTSIDE_CHANGE_S, "InterfacesAdded")
    props = {k: v.value for k, v in msg.body[1][VM].items()}
    assert (props["State"], props["StateReason"], props["Persistent"]) == (
        "running",
        "booted",
        False,
    )
    since = mark(client)
    await virsh("destroy", transient.name)
    await wait_signal(client, removed, since, OUTSIDE_CHANGE_S, "InterfacesRemoved")


# -- libvirtd going away ---------------------------------------------------------------------


async def test_libvirtd_killed_and_restarted_three_times(
    neurond: StartNeurond,
    client: Client,
    domains: MakeDomain,
    libvirt_daemons: LibvirtDaemons,
) -> None:
    running = domains()
    idle = domains()
    await virsh("start", running.name)
    neurond()
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True

    for cycle in range(3):
        known = await vm_state(client, running.path)
        assert known[0] == "running"
        since = mark(client)
        await asyncio.to_thread(libvirt_daemons.kill_libvirtd)
        lost_s = await wait_connected(client, False, since, DISCONNECT_NOTICED_S)

        # Reads answer from the last known state.
        before = await list_vms(client)
        assert before[running.name] == "running"
        assert before[idle.name] == "shutoff"
        assert await vm_state(client, running.path) == known
        # Every lifecycle call fails at once.
        for dom, member, args in [
            (running, "Pause", ()),
            (running, "ForceOff", ()),
            (running, "Shutdown", ({},)),
            (idle, "Start", ({},)),
        ]:
            _, took = await expect_error(
                "LibvirtConnectionFailed", call_vm(client, dom, member, *args)
            )
            assert took < FAIL_FAST_S, f"{member} took {took:.2f} s to fail"

        since = mark(client)
        await asyncio.to_thread(libvirt_daemons.start_libvirtd)
        back_s = await wait_connected(client, True, since, 30.0)
        print(f"cycle {cycle}: Connected false after {lost_s:.2f} s, true {back_s:.2f} s "
              "after libvirtd started")  # fmt: skip
        assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True
        assert await list_vms(client) == await asyncio.to_thread(virsh_list_all)

        # The event callbacks were registered again.
        for command, state, reason in [
            ("suspend", "paused", "user"),
            ("resume", "running", "unpaused"),
        ]:
            since = mark(client)
            await virsh(command, running.name)
            await wait_state(client, running.path, state, reason, since, OUTSIDE_CHANGE_S)


RETRY_LOG = re.compile(r"retrying in (\d+(?:\.\d+)?) s")


async def test_changes_while_disconnected_are_picked_up_by_the_resynchronisation(
    neurond: StartNeurond,
    client: Client,
    domains: MakeDomain,
    libvirt_daemons: LibvirtDaemons,
) -> None:
    running = domains()  # destroyed while neurond is away
    gone = domains()  # undefined while neurond is away
    new = domains(define=False)  # defined while neurond is away
    await virsh("start", running.name)
    daemon = neurond()

    since = mark(client)
    await asyncio.to_thread(libvirt_daemons.kill_libvirtd)
    await wait_connected(client, False, since, DISCONNECT_NOTICED_S)
    # neurond retries with a growing delay: once it waits 4 s before the next attempt, there is
    # time to restart libvirtd and change things before neurond is back.
    deadline = time.monotonic() + 20
    while not any(float(d) >= 4.0 for d in RETRY_LOG.findall(daemon.stderr_text())):
        assert time.monotonic() < deadline, (
            "no reconnect attempt with a 4 s delay:\n" + (daemon.stderr_text()[-3000:])
        )
        await asyncio.sleep(0.02)
    await asyncio.to_thread(libvirt_daemons.start_libvirtd)
    await define_xml_async(new.xml)
    await virsh("undefine", gone.name)
    await virsh("destroy", running.name)
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is False, (
        "neurond reconnected before the changes were done: this run proves nothing"
    )

    await wait_connected(client, True, since, 30.0)
    assert await list_vms(client) == await asyncio.to_thread(virsh_list_all)
    assert await vm_state(client, running.path) == ("shutoff", "destroyed")
    assert await client.get(new.path, VM, "Name") == new.name

    # Resynchronised before Connected came back, each change announced on the bus.
    signals = client.signals[since:]
    connected_at = next(
        i for i, m in enumerate(signals)
        if m.path == MANAGER_PATH and m.body[1].get("Connected", Variant("b", False)).value
    )  # fmt: skip
    added_at = next(
        i for i, m in enumerate(signals) if m.member == "InterfacesAdded" and m.body[0] == new.path
    )
    removed_at = next(
        i for i, m in enumerate(signals)
        if m.member == "InterfacesRemoved" and m.body[0] == gone.path
    )  # fmt: skip
    destroyed_at = next(
        i for i, m in enumerate(signals)
        if m.member == "PropertiesChanged" and m.path == running.path
        and m.body[1].get("State", Variant("s", "")).value == "shutoff"
    )  # fmt: skip
    assert max(added_at, removed_at, destroyed_at) < connected_at
    assert state_changes(client, running.path, since) == [("shutoff", "destroyed")]


async def test_hung_libvirtd_is_noticed_by_the_keepalive(
    neurond: StartNeurond,
    client: Client,
    domains: MakeDomain,
    libvirt_daemons: LibvirtDaemons,
) -> None:
    dom = domains()
    neurond()
    pid = libvirt_daemons.libvirtd_pid()
    assert pid is not None
    since = mark(client)
    os.kill(pid, signal.SIGSTOP)
    try:
        lost_s = await wait_connected(client, False, since, DISCONNECT_NOTICED_S)
        print(f"stopped libvirtd noticed after {lost_s:.1f} s")
        _, took = await expect_error("LibvirtConnectionFailed", call_vm(client, dom, "Start", {}))
        assert took < FAIL_FAST_S
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_connected(client, True, since, 30.0)
    await call_vm(client, dom, "Start", {})
    assert await vm_state(client, dom.path) == ("running", "booted")


async def test_neurond_started_before_libvirtd_connects_when_it_comes(
    neurond: StartNeurond,
    client: Client,
    domains: MakeDomain,
    libvirt_daemons: LibvirtDaemons,
) -> None:
    dom = domains()
    await asyncio.to_thread(libvirt_daemons.kill_libvirtd)
    # call_s bounds how long neurond waits for libvirt before it serves (and says READY=1).
    neurond(timeouts={"call_s": 2})
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is False
    await expect_error("VMNotFound", client.call(MANAGER_PATH, MANAGER, "GetVM", "s", [dom.name]))

    since = mark(client)
    await asyncio.to_thread(libvirt_daemons.start_libvirtd)
    took = await wait_connected(client, True, since, 30.0)
    print(f"connected {took:.1f} s after libvirtd started")
    added_at = next(
        i for i, m in enumerate(client.signals[since:])
        if m.member == "InterfacesAdded" and m.body[0] == dom.path
    )  # fmt: skip
    connected_at = next(
        i for i, m in enumerate(client.signals[since:])
        if m.path == MANAGER_PATH and "Connected" in m.body[1]
    )  # fmt: skip
    assert added_at < connected_at, "Connected=true came before the VM list was read"
    assert await list_vms(client) == await asyncio.to_thread(virsh_list_all)
    await call_vm(client, dom, "Start", {})
    assert await vm_state(client, dom.path) == ("running", "booted")


async def test_shutdown_job_survives_a_libvirtd_restart(
    neurond: StartNeurond,
    client: Client,
    domains: MakeDomain,
    libvirt_daemons: LibvirtDaemons,
) -> None:
    dom = domains()
    neurond()
    await start_and_boot(client, dom)

    since = mark(client)
    job = await shutdown_job(client, dom)
    # The guest powers off while libvirtd is away; neurond learns it after the reconnect.
    await asyncio.to_thread(libvirt_daemons.kill_libvirtd)
    await wait_connected(client, False, since, DISCONNECT_NOTICED_S)
    deadline = time.monotonic() + 15
    while "NRDTEST-POWERBUTTON" not in dom.serial_text():
        assert time.monotonic() < deadline, (
            "the guest never saw the power button; serial log:\n" + dom.serial_text()
        )
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # its poweroff -f
    assert await client.get(job, JOB, "State") == "running"
    await asyncio.to_thread(libvirt_daemons.start_libvirtd)
    await wait_connected(client, True, since, 30.0)
    (success, error_name, message), _ = await wait_job(client, job, since, 15.0)
    assert (success, error_name) == (True, ""), message
    state, reason = await vm_state(client, dom.path)
    assert state == "shutoff"
    assert (await virsh("domstate", dom.name)).strip() == "shut off"
    print(f"after the restart: {state}/{reason}")
