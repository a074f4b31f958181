"""Reliability on a real libvirtd (issue 9, items 1, 2 and 5), through D-Bus only.

Extends tests/integration/test_real_libvirt.py (libvirtd killed 3 times, keepalive, resync)
and test_create_real.py (SIGKILL mid-create): here libvirtd is killed 5 times in a row under
load from 10 clients while a VM is being started; a guest's QEMU process is killed behind
neurond's back; and neurond gets SIGTERM with a create job running.

Run only under the shared lock (other sessions use the same libvirtd):
    flock /tmp/neurond-libvirtd.lock .venv/bin/python -m pytest \
        tests/integration/test_reliability_real.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from neurond import messages
from tests.bus.conftest import (
    ERR,
    JOB,
    MANAGER,
    MANAGER_PATH,
    NAME,
    ROOT,
    VM,
    CallFailed,
    Client,
)
from tests.harness import Daemon, PrivateBus
from tests.integration.conftest import (
    URI,
    Guest,
    LibvirtDaemons,
    MakeDomain,
    define_xml_async,
    virsh,
    virsh_list_all,
)
from tests.integration.test_create_real import (
    QEMU,
    assert_nothing_left,
    create,
    create_tiny_linux,
    media,
    name,
    real,
    spec,
    uuid_of,
    volumes,
    wait_job,
)
from tests.integration.test_real_libvirt import (
    list_vms,
    mark,
    object_signals,
    state_changes,
    wait_connected,
    wait_signal,
    wait_state,
)
from tests.journal import PrivateJournal

__all__ = ["media", "real"]  # the fixtures, shared with test_create_real.py

CALL_S = 5  # timeouts.call_s for these tests: "within the call timeout" is then checkable
STOP_S = 10
EVENT_S = 2.0  # a change made with virsh is on the bus within this
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


async def _reader(address: str, stop: asyncio.Event, log: list[tuple[str, str, float]]) -> None:
    """ListVMs and GetManagedObjects in turn until ``stop``: (member, outcome, seconds) each."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        n = 0
        while not stop.is_set():
            member, path, iface = (
                ("ListVMs", MANAGER_PATH, MANAGER)
                if n % 2 == 0
                else ("GetManagedObjects", ROOT, OBJECT_MANAGER)
            )
            n += 1
            t0 = time.monotonic()
            try:
                reply = await asyncio.wait_for(
                    bus.call(Message(destination=NAME, path=path, interface=iface, member=member)),
                    CALL_S + 5,
                )
                assert reply is not None
                outcome = reply.error_name or "ok"
            except TimeoutError:
                outcome = "no reply"
            log.append((member, outcome, time.monotonic() - t0))
            await asyncio.sleep(0.02)
    finally:
        bus.disconnect()


async def _start_outcome(client: Client, path: str) -> str:
    try:
        await client.call(path, VM, "Start", "a{sv}", [{}])
    except Exception as e:  # noqa: BLE001 — the error name is the outcome
        return getattr(e, "name", repr(e))
    return "ok"


async def lifecycle_events_arrive(client: Client, domains: MakeDomain, cycle: int) -> None:
    """After a reconnect libvirt's events reach the bus: a domain defined and undefined with
    virsh appears and goes as InterfacesAdded / InterfacesRemoved (no resync happens now)."""
    probe = domains(define=False)

    added, removed = object_signals(probe.path)

    since = mark(client)
    await define_xml_async(probe.xml)
    await wait_signal(client, added, since, EVENT_S, f"cycle {cycle}: InterfacesAdded")
    since = mark(client)
    await virsh("undefine", probe.name)
    await wait_signal(client, removed, since, EVENT_S, f"cycle {cycle}: InterfacesRemoved")


async def test_libvirtd_killed_five_times_under_load(
    private_bus: PrivateBus,
    start_daemon: Callable[..., Daemon],
    client: Client,
    domains: MakeDomain,
    libvirt_daemons: LibvirtDaemons,
) -> None:
    dom = domains()
    d = start_daemon(libvirt_uri=URI, config={"timeouts": {"call_s": CALL_S}})
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True
    stop = asyncio.Event()
    log: list[tuple[str, str, float]] = []
    readers = [asyncio.ensure_future(_reader(private_bus.address, stop, log)) for _ in range(10)]
    starts: list[str] = []
    try:
        for cycle in range(5):
            # A VM is being started when libvirtd dies.
            if virsh_list_all().get(dom.name) != "shutoff":
                await virsh("destroy", dom.name, check=False)
            starting = asyncio.ensure_future(_start_outcome(client, dom.path))
            # From "just sent" to "done" (a start takes about 0.3 s here).
            await asyncio.sleep([0.0, 0.1, 0.2, 0.35, 1.0][cycle])
            since = mark(client)
            await asyncio.to_thread(libvirt_daemons.kill_libvirtd)
            await wait_connected(client, False, since, 10.0)
            starts.append(await asyncio.wait_for(starting, CALL_S + 5))
            since = mark(client)
            await asyncio.to_thread(libvirt_daemons.start_libvirtd)
            await wait_connected(client, True, since, 30.0)
            # Within 2 s the VM list and states are virsh's.
            deadline = time.monotonic() + 2.0
            while (ours := await list_vms(client)) != (theirs := virsh_list_all()):
                assert time.monotonic() < deadline, f"cycle {cycle}: {ours} != virsh {theirs}"
                await asyncio.sleep(0.05)
            assert d.proc is not None and d.proc.poll() is None, d.stderr_text()[-3000:]
            await lifecycle_events_arrive(client, domains, cycle)
    finally:
        stop.set()
        await asyncio.gather(*readers, return_exceptions=True)
    assert d.proc is not None and d.proc.poll() is None, d.stderr_text()[-3000:]
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True
    # The Start in flight got an answer each time: done, or the typed connection failure
    # (or InvalidState when libvirt had started it before dying and the resync saw it).
    allowed = {"ok", ERR + "LibvirtConnectionFailed", ERR + "InvalidState", ERR + "VMStartFailed"}
    assert set(starts) <= allowed, starts
    outcomes = {o for _, o, _ in log}
    assert outcomes <= {"ok", ERR + "LibvirtConnectionFailed"}, outcomes
    slow = [entry for entry in log if entry[2] > CALL_S + 0.5]
    assert not slow, f"calls over the {CALL_S} s call timeout: {slow[:10]}"
    assert len(log) > 100, len(log)
    # Lifecycle events still arrive after the fifth reconnect.
    if virsh_list_all().get(dom.name) == "running":
        since = mark(client)
        await virsh("suspend", dom.name)
        await wait_state(client, dom.path, "paused", "user", since, 2.0)
    print(f"{len(log)} reads, slowest {max(t for *_, t in log):.2f} s; starts: {starts}")


async def test_qemu_killed_behind_neurond_s_back(
    neurond: Callable[..., Daemon], client: Client, domains: MakeDomain
) -> None:
    dom = domains()
    neurond()
    await virsh("start", dom.name)
    deadline = time.monotonic() + 10
    while await client.get(dom.path, VM, "State") != "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    pid = int(Path(f"/run/libvirt/qemu/{dom.name}.pid").read_text().strip())
    since = mark(client)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not state_changes(client, dom.path, since):
        assert time.monotonic() < deadline, "no state change after QEMU was killed"
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)  # any second change would be here by now
    changes = state_changes(client, dom.path, since)
    assert len(changes) == 1, changes
    state, reason = changes[0]
    assert state in ("crashed", "shutoff"), changes
    # libvirt's own words: "shut off (crashed)" → ("shutoff", "crashed").
    words = (await virsh("domstate", "--reason", dom.name)).strip()
    lv_state, _, lv_reason = words.partition(" (")
    assert lv_state.replace(" ", "") == state, (words, changes)
    assert lv_reason.rstrip(")").replace(" ", "-") == reason, (words, changes)


async def test_sigterm_with_a_create_job_running(
    real: Callable[..., Daemon],
    client: Client,
    domains: MakeDomain,
) -> None:
    existing = domains()  # a VM neurond did not make: still there, once, after the restart
    d = real(faults="create.autostart:delay:30", config={"timeouts": {"stop_s": STOP_S}})
    vm_name = name()
    vm, job = await create(client, name=vm_name, profile="windows11", looking_glass=True,
                           autostart=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while vm_name not in virsh_list_all():  # defined: the job is mid-way
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    since = mark(client)
    in_flight = asyncio.ensure_future(client.call(MANAGER_PATH, MANAGER, "ListVMs"))
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(d.proc.wait, STOP_S + 5)
    took = time.monotonic() - t0
    assert code == 0, d.stderr_text()[-3000:]
    assert took < STOP_S, took
    d.stop()  # collects the last notifications
    assert "STOPPING=1" in d.notifications
    # The job ended cancelled (its last signals went out before neurond left).
    done = [
        m.body
        for m in client.signals[since:]
        if m.member == "Completed" and m.path == job and m.interface == JOB
    ]
    assert len(done) == 1 and done[0][:2] == [False, ERR + "Cancelled"], done
    # The call in flight at SIGTERM was answered (a result, or the typed "stopping" error).
    (answer,) = await asyncio.gather(in_flight, return_exceptions=True)
    assert isinstance(answer, list | CallFailed), answer
    assert_nothing_left(d, vm_name, uuid_of(vm))

    # A second start sees every VM once, the existing one included.
    again = Daemon(d.bus, libvirt_uri=URI, config=QEMU)
    try:
        again.start()
        names = [n for n, *_ in (await client.call(MANAGER_PATH, MANAGER, "ListVMs"))[0]]
        assert sorted(names) == sorted(set(names)) == sorted(virsh_list_all()), names
        assert existing.name in names and vm_name not in names
        (objects,) = await client.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
        vm_objects = [p for p, ifaces in objects.items() if VM in ifaces]
        assert len(vm_objects) == len(names)
    finally:
        again.close()


# -- SIGKILL mid-create and mid-delete, then a fresh start -----------------------------------


def fresh_start(d: Daemon, journal: PrivateJournal) -> Daemon:
    """A new neurond on ``d``'s bus, configuration, image and state directories (``d`` is
    dead), logging to ``journal``."""
    again = Daemon(
        d.bus,
        libvirt_uri=URI,
        config=QEMU,
        wrap=journal.wrap,
        extra_args=["--log-target", "journal"],
    )
    again.image_dir.rmdir()
    again.state_dir.rmdir()
    again.image_dir, again.state_dir = d.image_dir, d.state_dir
    again.config_path.write_text(d.config_path.read_text())
    return again


def kill(d: Daemon) -> None:
    assert d.proc is not None
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.proc.wait()


async def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


def record(d: Daemon, kind: str, uuid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((d.state_dir / f"{kind}-{uuid}.json").read_text())
    return data


async def exported(client: Client) -> tuple[set[str], set[str]]:
    """(VM object paths of GetManagedObjects, names of ListVMs)."""
    (objects,) = await client.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    return {p for p, ifaces in objects.items() if VM in ifaces}, {row[0] for row in vms}


def journal_tail(journal: PrivateJournal, n: int = 40) -> str:
    """neurond's last ``n`` journal messages, for a failing assertion."""
    entries = journal.entries(SYSLOG_IDENTIFIER="neurond")[-n:]
    return "\n".join(e.get("MESSAGE", "") for e in entries)


def recovered(journal: PrivateJournal, kind: str, uuid: str) -> dict[str, str]:
    """The journal entry of the completed recovery (catalogued, with structured fields)."""
    return journal.wait_for(
        timeout=10,
        MESSAGE_ID=messages.RECOVERED,
        NEUROND_OPERATION=kind,
        NEUROND_UUID=uuid,
        SYSLOG_IDENTIFIER="neurond",
    )


async def test_sigkill_mid_create_and_mid_delete_then_a_fresh_start(
    real: Callable[..., Daemon], client: Client
) -> None:
    """One neurond is killed with a delete (domain undefined, volume and shm file not yet
    removed) and a create (domain defined, autostart not set) in flight. The next start
    rolls the delete forward and the create back: exactly what their records name goes."""
    d = real(faults="delete.volumes:delay:60,create.autostart:delay:60")
    gone_name, new_name = name(), name()
    gone, job = await create(client, name=gone_name, profile="windows11", looking_glass=True)
    assert (await wait_job(client, job))[:2] == ("completed", "")
    gone_uuid = uuid_of(gone)
    volume = d.image_dir / f"{gone_name}-{gone_uuid}.qcow2"
    shm = Path(f"/dev/shm/looking-glass-{gone_uuid}")
    assert volume.is_file() and shm.exists()
    (djob,) = await client.call(gone, VM, "Delete", "a{sv}", [spec(delete_storage=True)])
    await wait_until("the domain undefined", lambda: gone_name not in virsh_list_all())
    new, _ = await create(client, name=new_name, profile="windows11", looking_glass=True,
                          autostart=True)  # fmt: skip
    new_uuid = uuid_of(new)
    await wait_until("the new domain defined", lambda: new_name in virsh_list_all())
    kill(d)

    # The delete record names the domain and exactly the VM's volume, NVRAM and shm file.
    rec = record(d, "delete", gone_uuid)
    assert (rec["kind"], rec["version"], rec["uuid"]) == ("delete", 1, gone_uuid), rec
    assert rec["volumes"] == [str(volume)], rec
    assert rec["files"] == [str(d.image_dir / f"{gone_name}-{gone_uuid}_VARS.fd"), str(shm)]
    assert volume.is_file() and shm.exists()  # killed before their removal
    assert record(d, "create", new_uuid)["kind"] == "create"
    # Unrelated files in the same directories stay.
    (d.image_dir / "not-ours.iso").write_bytes(b"x")
    (d.state_dir / "notes.txt").write_text("x")

    with PrivateJournal() as journal:
        again = fresh_start(d, journal)
        try:
            again.start()
            deleted = recovered(journal, "delete", gone_uuid)
            rolled_back = recovered(journal, "create", new_uuid)
            assert deleted["NEUROND_VM"] == gone_name and str(volume) in deleted["NEUROND_REMOVED"]
            assert rolled_back["NEUROND_VM"] == new_name
            listed = virsh_list_all()
            assert gone_name not in listed and new_name not in listed
            assert not volume.exists() and not shm.exists()
            assert [n for n in os.listdir("/dev/shm") if new_uuid in n] == []
            assert volumes(d.image_dir) == ["not-ours.iso"]
            assert os.listdir(d.image_dir) == ["not-ours.iso"]
            assert os.listdir(d.state_dir) == ["notes.txt"]  # both records gone
            paths, names = await exported(client)
            assert gone not in paths and new not in paths, paths
            assert gone_name not in names and new_name not in names, names
            with pytest.raises(CallFailed):
                await client.get(djob, JOB, "State")  # jobs die with their neurond
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"{e}\njournal:\n{journal_tail(journal)}") from e
        finally:
            again.close()


@pytest.mark.parametrize("point", ["delete.stop", "delete.domain"])
async def test_sigkill_mid_delete_of_a_running_vm_then_a_fresh_start(
    real: Callable[..., Daemon], client: Client, guest: Guest, media: Path, point: str
) -> None:
    """A running VM (the tiny guest) is deleted with force; neurond is killed before the stop
    (the next start must destroy the running domain) or after it (domain shut off, still
    defined). The next start removes the domain and its volume and nothing else."""
    d = real(
        faults=f"{point}:delay:60",
        config={"storage": {"iso_roots": [str(media)]}, "timeouts": {"shutdown_s": 1}},
    )
    d.dir.chmod(0o755)  # qemu (libvirt-qemu) opens the disk
    d.image_dir.chmod(0o755)
    vm_name = name()
    vm = await create_tiny_linux(client, guest, media, vm_name)
    uuid = uuid_of(vm)
    await client.call(vm, VM, "Start", "a{sv}", [{}])
    await wait_until("running", lambda: virsh_list_all().get(vm_name) == "running")
    await client.call(vm, VM, "Delete", "a{sv}", [spec(delete_storage=True, force=True)])
    rec_path = d.state_dir / f"delete-{uuid}.json"
    await wait_until("the delete record", rec_path.exists)
    if point == "delete.domain":  # stopped (ACPI ignored: destroyed after 1 s), not undefined
        await wait_until("shut off", lambda: virsh_list_all().get(vm_name) == "shutoff")
    else:
        assert virsh_list_all().get(vm_name) == "running"
    kill(d)
    volume = d.image_dir / f"{vm_name}-{uuid}.qcow2"
    rec = record(d, "delete", uuid)
    assert (rec["volumes"], rec["files"]) == ([str(volume)], []), rec
    assert volume.is_file()
    (d.image_dir / "not-ours.iso").write_bytes(b"x")

    with PrivateJournal() as journal:
        again = fresh_start(d, journal)
        try:
            again.start()
            entry = recovered(journal, "delete", uuid)
            assert entry["NEUROND_VM"] == vm_name
            assert vm_name not in virsh_list_all()
            assert not volume.exists()
            assert os.listdir(d.image_dir) == ["not-ours.iso"]
            assert volumes(d.image_dir) == ["not-ours.iso"]
            assert os.listdir(d.state_dir) == []
            paths, names = await exported(client)
            assert vm not in paths and vm_name not in names
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"{e}\njournal:\n{journal_tail(journal)}") from e
        finally:
            again.close()
