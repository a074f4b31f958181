"""Soak (issue 9, item 7): 20,000 calls over 1,000 short-lived client connections.

neurond's open file descriptors (/proc/PID/fd), threads (/proc/PID/task) and asyncio tasks (as the
fault hook's ``tasks`` probe logs them, at a member the soak never calls) return to their
baseline afterwards, and its per-sender state is empty again: a flooding client still gets
exactly the configured number of calls in flight (a leaked per-sender entry or a call task that
never ended would eat into it). The baseline is taken after a warm-up of the same shape and
after neurond's libvirt worker pool has grown to its fixed size (a pool grows on demand and
never shrinks: that is not a leak, but it would move the thread count). RSS over the same soak is
measured by bench/soak.py (docs/reliability.md), not asserted here.

    python -m tests.bus.test_soak ADDRESS CONNECTIONS CALLS_PER_CONNECTION PARALLEL  # a worker
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests.bus.conftest import (
    DBUS_ERR,
    ERR,
    HOOKS,
    MANAGER,
    MANAGER_PATH,
    NAME,
    PROPERTIES,
    ROOT,
    VM,
    Client,
    flood,
)
from tests.harness import REPO_ROOT, Daemon, PrivateBus, make_test_node_xml, node_uri

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
HARDWARE = "org.neuronos.Neuron1.Hardware"
CALL_TIMEOUT_S = 30.0
N_WORKERS = 2
CONNECTIONS = 1000  # in all
CALLS_PER_CONNECTION = 20
PARALLEL = 8  # connections open at once per worker
NODE_DOMAINS = 8
REBOOT_HOLD_S = 0.5


def vm_path(i: int) -> str:
    return f"{ROOT}/vm/6e657572_6f6e_4000_8000_{i:012x}"  # as tests.harness.make_test_node_xml


VM0 = vm_path(0)

# (path, interface, member, signature, body, acceptable outcomes)
CALLS: list[tuple[str, str, str, str, list[Any], frozenset[str]]] = [
    (MANAGER_PATH, MANAGER, "ListVMs", "", [], frozenset({"ok"})),
    (MANAGER_PATH, MANAGER, "GetVM", "s", ["vm0000"], frozenset({"ok"})),
    (MANAGER_PATH, MANAGER, "GetVM", "s", ["nosuch"], frozenset({ERR + "VMNotFound"})),
    (VM0, PROPERTIES, "Get", "ss", [VM, "State"], frozenset({"ok"})),
    (VM0, VM, "Pause", "", [], frozenset({"ok", ERR + "InvalidState"})),
    (ROOT, OBJECT_MANAGER, "GetManagedObjects", "", [], frozenset({"ok"})),
    (VM0, VM, "Resume", "", [], frozenset({"ok", ERR + "InvalidState"})),
    (MANAGER_PATH, MANAGER, "Frobnicate", "", [], frozenset({DBUS_ERR + "UnknownMethod"})),
    (MANAGER_PATH, MANAGER, "ListErrors", "", [], frozenset({"ok"})),
    (MANAGER_PATH, MANAGER, "GetVM", "i", [1], frozenset({DBUS_ERR + "InvalidArgs"})),
]


async def _one_connection(address: str, index: int, n_calls: int) -> list[str]:
    bus = await MessageBus(bus_address=address).connect()
    problems: list[str] = []
    try:
        for n in range(n_calls):
            path, iface, member, sig, body, want = CALLS[(index + n) % len(CALLS)]
            msg = Message(destination=NAME, path=path, interface=iface, member=member,
                          signature=sig, body=body)  # fmt: skip
            if index % 10 == 9 and n == n_calls - 1:
                # Every tenth connection leaves with its last call in flight.
                bus.send(msg)
                break
            reply = await asyncio.wait_for(bus.call(msg), CALL_TIMEOUT_S)
            assert reply is not None
            got = "ok" if reply.message_type is MessageType.METHOD_RETURN else reply.error_name
            if got not in want:
                problems.append(f"connection {index} {member}: {got} {reply.body!r:.200}")
    finally:
        bus.disconnect()
    return problems


async def soak(
    address: str, connections: int, calls: int, parallel: int, first: int = 0
) -> dict[str, Any]:
    """``connections`` short-lived connections, ``parallel`` at a time, ``calls`` calls each."""
    queue = iter(range(first, first + connections))
    problems: list[str] = []

    async def lane() -> None:
        for i in queue:
            try:
                problems.extend(await _one_connection(address, i, calls))
            except Exception as e:  # noqa: BLE001 — reported, counted as a problem
                problems.append(f"connection {i}: {e!r}")

    t0 = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(parallel)))
    return {"problems": problems, "elapsed": time.monotonic() - t0}


async def run_workers(
    address: str, connections: int, calls: int, workers: int = N_WORKERS
) -> list[str]:
    """The soak spread over ``workers`` processes; every problem they found."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bus.test_soak",
            address,
            str(connections // workers),
            str(calls),
            str(PARALLEL),
            str(w * connections),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in range(workers)
    ]
    problems: list[str] = []
    for p in procs:
        out, err = await p.communicate()
        assert p.returncode == 0, err.decode()[-3000:]
        problems.extend(json.loads(out)["problems"])
    return problems


def resources(pid: int) -> tuple[int, int]:
    """(open fds, threads) of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


PROBE = "GetIOMMUStatus"  # the soak never calls it; the fault `bus.GetIOMMUStatus:tasks` probes
PROBE_LINE = re.compile(rf"Probe bus\.{PROBE}: (\d+) asyncio tasks")


async def asyncio_tasks(client: Client, d: Daemon) -> int:
    """neurond's asyncio tasks now (the probe's own call included, the same every time)."""
    await client.call(MANAGER_PATH, HARDWARE, PROBE)
    return int(PROBE_LINE.findall(d.stderr_text())[-1])


def make_node(directory: Path) -> str:
    """The soak's test-driver node: NODE_DOMAINS running domains vm0000…; its URI."""
    make_test_node_xml(directory / "node.xml", NODE_DOMAINS, running_every=1)
    return node_uri(directory / "node.xml")


async def fill_libvirt_pool(address: str) -> None:
    """Grow neurond's libvirt worker pool to its size (4, neurond.virt.backend), so that the
    soak cannot add a thread to it: NODE_DOMAINS Reboots held in the workers at once (the
    fault `virt.reboot:delay`, a point the soak itself never reaches)."""
    clients = [Client(await MessageBus(bus_address=address).connect()) for _ in range(2)]
    try:
        await asyncio.gather(
            *(clients[i % 2].call(vm_path(i), VM, "Reboot") for i in range(NODE_DOMAINS))
        )
    finally:
        for c in clients:
            c.bus.disconnect()


async def test_soak_returns_to_baseline(
    tmp_path: Path, private_bus: PrivateBus, start_daemon: Callable[..., Daemon], client: Client
) -> None:
    limit = 5
    d = start_daemon(
        libvirt_uri=make_node(tmp_path),
        config={"limits": {"calls_per_sender": limit}},
        extra_args=HOOKS,
        # Only the flood calls ListJobs; only fill_libvirt_pool calls Reboot.
        env={
            "NEUROND_FAULTS": f"bus.ListJobs:delay:0.3,virt.reboot:delay:{REBOOT_HOLD_S},"
            f"bus.{PROBE}:tasks"
        },
    )
    address = private_bus.address
    await fill_libvirt_pool(address)
    # Warm-up of the same shape, then the baseline.
    assert await run_workers(address, 100, CALLS_PER_CONNECTION) == []
    await asyncio.sleep(0.5)
    base = resources(d.pid)
    base_tasks = await asyncio_tasks(client, d)

    t0 = time.monotonic()
    problems = await run_workers(address, CONNECTIONS, CALLS_PER_CONNECTION)
    elapsed = time.monotonic() - t0
    assert not problems, f"{len(problems)} wrong replies:\n" + "\n".join(problems[:20])

    # Connections that left are noticed by the bus and then by neurond: allow a moment.
    deadline = time.monotonic() + 10
    while (now := resources(d.pid)) != base and time.monotonic() < deadline:
        if now[0] <= base[0] and now[1] <= base[1]:
            break
        await asyncio.sleep(0.2)
    assert now[0] <= base[0], f"open fds {base[0]} -> {now[0]}: {os.listdir(f'/proc/{d.pid}/fd')}"
    assert now[1] <= base[1], f"threads {base[1]} -> {now[1]}"
    while (tasks := await asyncio_tasks(client, d)) > base_tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert tasks <= base_tasks, f"asyncio tasks {base_tasks} -> {tasks}"
    outcomes = await flood(address, 3 * limit)
    assert outcomes.count("ok") == limit, outcomes
    assert outcomes.count(ERR + "LimitExceeded") == 2 * limit, outcomes
    assert d.proc is not None and d.proc.poll() is None
    assert "Traceback" not in d.stderr_text(), d.stderr_text()[-3000:]
    print(f"soak: {CONNECTIONS * CALLS_PER_CONNECTION} calls over {CONNECTIONS} connections "
          f"in {elapsed:.1f} s; fds {base[0]}->{now[0]}, threads {base[1]}->{now[1]}, "
          f"asyncio tasks {base_tasks}->{tasks}")  # fmt: skip


if __name__ == "__main__":
    _address, _conns, _calls, _parallel, _first = sys.argv[1:]
    print(json.dumps(asyncio.run(
        soak(_address, int(_conns), int(_calls), int(_parallel), int(_first)))))  # fmt: skip
