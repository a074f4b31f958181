"""Overload and concurrency (issue 9, items 3 and 4), on libvirt's test driver.

- 200 concurrent clients (4 worker processes x 50 connections) each make 50 mixed calls:
  reads, invalid calls (unknown VM, unknown method, bad signature, wrong state) and lifecycle
  calls on a VM of their own. Every client keeps a model of its VM, so every reply is checked
  exactly: the right result, or the right typed error. No connection is dropped.
- Clients that disconnect while their call is in flight disturb no one, and leave no entry in
  the per-sender table behind (a flood afterwards still gets exactly the configured limit).
- 100 concurrent mixed lifecycle calls on one VM: every call succeeds or fails with
  InvalidState; the recorded PropertiesChanged State sequence only holds transitions from
  API.md's state table; the final state is libvirt's (a probe call that libvirt itself must
  accept in that state, and only in it).

    python -m tests.bus.test_overload ADDRESS FIRST COUNT CALLS   # one worker (used by the test)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.bus.conftest import (
    DBUS_ERR,
    ERR,
    HOOKS,
    JOB,
    MANAGER,
    MANAGER_PATH,
    NAME,
    PROPERTIES,
    ROOT,
    TEST_PATH,
    VM,
    CallFailed,
    Client,
    flood,
)
from tests.harness import REPO_ROOT, Daemon, PrivateBus, make_test_node_xml, node_uri

N_WORKERS = 4
CLIENTS_PER_WORKER = 50
CALLS_PER_CLIENT = 50
CALL_TIMEOUT_S = 30.0


def vm_path(uuid: str) -> str:
    return f"{ROOT}/vm/{uuid.replace('-', '_')}"


def node_uuid(i: int) -> str:
    return f"6e657572-6f6e-4000-8000-{i:012x}"  # as tests.harness.make_test_node_xml


# ---- one worker: CLIENTS_PER_WORKER connections, each driving its own VM -------------------


async def _call(
    bus: MessageBus,
    path: str,
    iface: str,
    member: str,
    sig: str = "",
    body: list[Any] | None = None,
) -> Message:
    msg = Message(destination=NAME, path=path, interface=iface, member=member,
                  signature=sig, body=body or [])  # fmt: skip
    reply = await asyncio.wait_for(bus.call(msg), CALL_TIMEOUT_S)
    assert reply is not None
    return reply


def _expect(reply: Message, want: str, what: str) -> str:
    """ "" when ``reply`` is a return (want "ok") or the error ``want``; else the problem."""
    got = "ok" if reply.message_type is MessageType.METHOD_RETURN else reply.error_name or "?"
    if got != want:
        return f"{what}: got {got} {reply.body!r:.200}, want {want}"
    if got != "ok" and reply.signature != "s":
        return f"{what}: error body of signature {reply.signature!r}, want 's'"
    return ""


async def _client(bus: MessageBus, index: int, n_calls: int, n_domains: int) -> list[str]:
    name = f"vm{index:04d}"
    path = vm_path(node_uuid(index))
    state = "running" if index % 2 == 0 else "shutoff"  # make_test_node_xml's default
    problems: list[str] = []
    for n in range(n_calls):
        step = n % 10
        what = f"{name} call {n}"
        if step == 0:
            r = await _call(bus, MANAGER_PATH, MANAGER, "ListVMs")
            p = _expect(r, "ok", what + " ListVMs")
            if not p and len(r.body[0]) != n_domains:
                p = f"{what} ListVMs: {len(r.body[0])} VMs, want {n_domains}"
        elif step == 1:
            r = await _call(bus, MANAGER_PATH, MANAGER, "GetVM", "s", [name])
            p = _expect(r, "ok", what + " GetVM")
            if not p and r.body != [path]:
                p = f"{what} GetVM: {r.body}, want {path}"
        elif step == 2:
            r = await _call(bus, MANAGER_PATH, MANAGER, "GetVM", "s", [f"nosuch-{index}"])
            p = _expect(r, ERR + "VMNotFound", what + " GetVM unknown")
        elif step == 3:
            r = await _call(bus, path, VM, "Pause")
            p = _expect(r, "ok" if state == "running" else ERR + "InvalidState", what + " Pause")
            state = "paused" if state == "running" else state
        elif step == 4:
            r = await _call(bus, path, PROPERTIES, "Get", "ss", [VM, "State"])
            p = _expect(r, "ok", what + " Get State")
            if not p and r.body[0].value != state:
                p = f"{what} State: {r.body[0].value}, want {state}"
        elif step == 5:
            r = await _call(bus, path, VM, "Resume")
            p = _expect(r, "ok" if state == "paused" else ERR + "InvalidState", what + " Resume")
            state = "running" if state == "paused" else state
        elif step == 6:
            r = await _call(bus, MANAGER_PATH, MANAGER, "Frobnicate")
            p = _expect(r, DBUS_ERR + "UnknownMethod", what + " unknown method")
        elif step == 7:
            # Every other round the VM stays as it is, so Start below is refused half the time.
            if n % 20 == 7:
                r = await _call(bus, path, VM, "ForceOff")
                ok = state in ("running", "paused")
                p = _expect(r, "ok" if ok else ERR + "InvalidState", what + " ForceOff")
                state = "shutoff"
            else:
                r = await _call(bus, path, PROPERTIES, "GetAll", "s", [VM])
                p = _expect(r, "ok", what + " GetAll")
                if not p and r.body[0]["Name"].value != name:
                    p = f"{what} GetAll: Name {r.body[0]['Name'].value}, want {name}"
        elif step == 8:
            r = await _call(bus, path, VM, "Start", "a{sv}", [{}])
            p = _expect(r, "ok" if state == "shutoff" else ERR + "InvalidState", what + " Start")
            state = "running"
        else:
            r = await _call(bus, MANAGER_PATH, MANAGER, "GetVM", "i", [5])
            p = _expect(r, DBUS_ERR + "InvalidArgs", what + " bad signature")
        if p:
            problems.append(p)
    return problems


async def _worker(
    address: str, first: int, count: int, n_calls: int, n_domains: int
) -> dict[str, Any]:
    buses = [await MessageBus(bus_address=address).connect() for _ in range(count)]
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(_client(b, first + i, n_calls, n_domains) for i, b in enumerate(buses)),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - t0
    problems: list[str] = []
    for i, res in enumerate(results):
        if isinstance(res, BaseException):
            problems.append(f"client {first + i}: {res!r}")
        else:
            problems.extend(res)
    dropped = sum(1 for b in buses if not b.connected)
    for b in buses:
        b.disconnect()
    return {"problems": problems, "dropped": dropped, "elapsed": elapsed}


# ---- tests ---------------------------------------------------------------------------------


async def _disconnect_mid_call(address: str) -> None:
    """A client sends a slow call and leaves before the reply."""
    bus = await MessageBus(bus_address=address).connect()
    fut = asyncio.ensure_future(bus.call(Message(
        destination=NAME, path=MANAGER_PATH, interface=MANAGER, member="ListJobs")))  # fmt: skip
    await asyncio.sleep(0.1)
    bus.disconnect()
    await asyncio.gather(fut, return_exceptions=True)


async def test_200_clients_50_mixed_calls(
    tmp_path: Path, private_bus: PrivateBus, start_daemon: Callable[..., Daemon]
) -> None:
    n_clients = N_WORKERS * CLIENTS_PER_WORKER
    make_test_node_xml(tmp_path / "node.xml", n_clients)
    limit = 8
    d = start_daemon(
        libvirt_uri=node_uri(tmp_path / "node.xml"),
        config={"limits": {"calls_per_sender": limit}},
        extra_args=HOOKS,
        # ListJobs is slow: the leaving clients and the flood below are in flight for a while.
        env={"NEUROND_FAULTS": "bus.ListJobs:delay:0.5"},
    )
    t0 = time.monotonic()
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bus.test_overload",
            private_bus.address,
            str(w * CLIENTS_PER_WORKER),
            str(CLIENTS_PER_WORKER),
            str(CALLS_PER_CLIENT),
            str(n_clients),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in range(N_WORKERS)
    ]
    # Meanwhile: 40 clients leave with their call in flight, and a flooder gets its limit.
    await asyncio.gather(*(_disconnect_mid_call(private_bus.address) for _ in range(40)))
    flooded = await flood(private_bus.address, 2 * limit)
    outputs = [await w.communicate() for w in workers]
    elapsed = time.monotonic() - t0

    problems: list[str] = []
    for w, (out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err.decode()[-3000:]
        result = json.loads(out)
        assert result["dropped"] == 0, result
        problems.extend(result["problems"])
    assert not problems, f"{len(problems)} wrong replies:\n" + "\n".join(problems[:20])
    assert flooded.count("ok") == limit and flooded.count(ERR + "LimitExceeded") == limit, flooded
    assert d.proc is not None and d.proc.poll() is None
    assert "bus connection was lost" not in d.stderr_text()
    assert "Traceback" not in d.stderr_text(), d.stderr_text()[-3000:]
    # Nothing of the leavers or the flooder is left in the per-sender table.
    assert (await flood(private_bus.address, 2 * limit)).count("ok") == limit
    print(f"{n_clients} clients x {CALLS_PER_CLIENT} calls in {elapsed:.1f} s")


# API.md's state table, as (from, to) pairs of the VM's State, for the methods used below.
LIFECYCLE = ["Start", "ForceOff", "Pause", "Resume", "Reboot", "Reset", "Shutdown"]
ALLOWED_TRANSITIONS = {
    ("shutoff", "starting"), ("crashed", "starting"),                   # Start
    ("starting", "running"), ("starting", "paused"),                    # … then libvirt's event
    ("starting", "shutoff"),                                            # a failed Start
    ("running", "stopping"), ("stopping", "shutoff"),                   # Shutdown
    ("running", "paused"), ("paused", "running"),                       # Pause, Resume
    ("running", "running"),                                             # Reboot, Reset
    *((s, "shutoff") for s in ("running", "paused", "starting", "stopping", "crashed",
                               "pmsuspended")),                         # ForceOff
}  # fmt: skip

# libvirt must accept exactly this call in the state neurond shows, so a success proves that
# libvirt agrees (each fails in libvirt with OPERATION_INVALID in any other state).
PROBE = {"running": ("Pause", "paused"), "paused": ("Resume", "running"),
         "shutoff": ("Start", "running")}  # fmt: skip


async def _lifecycle(client: Client, member: str, after_s: float = 0.0) -> str:
    await asyncio.sleep(after_s)
    sig, body = ("a{sv}", [{}]) if member in ("Start", "Shutdown") else ("", [])
    if member == "Shutdown":
        body = [{"timeout_s": Variant("u", 5), "force": Variant("b", True)}]
    try:
        await client.call(TEST_PATH, VM, member, sig, body)
    except CallFailed as e:
        return e.name
    return "ok"


async def test_100_concurrent_lifecycle_calls_on_one_vm(
    private_bus: PrivateBus, start_daemon: Callable[..., Daemon], client: Client
) -> None:
    # Slow libvirt calls, so the 100 calls really overlap inside neurond.
    faults = "virt.start:delay:0.02,virt.destroy:delay:0.02,virt.suspend:delay:0.01"
    start_daemon(extra_args=HOOKS, env={"NEUROND_FAULTS": faults})
    callers = [Client(await MessageBus(bus_address=private_bus.address).connect())
               for _ in range(10)]  # fmt: skip
    try:
        # Overlapping waves over about 2 s, so the VM goes round its states many times.
        rng = random.Random(9)
        calls = [
            _lifecycle(callers[i % 10], rng.choice(LIFECYCLE), rng.uniform(0, 2))
            for i in range(100)
        ]
        results = await asyncio.gather(*calls)
    finally:
        for c in callers:
            c.bus.disconnect()
    assert set(results) <= {"ok", ERR + "InvalidState"}, results

    # Settle: no job running, then no signal for a while.
    async def jobs_running() -> bool:
        (jobs,) = await client.call(MANAGER_PATH, MANAGER, "ListJobs")
        for job in jobs:
            try:
                st = await client.get(job, JOB, "State")
            except CallFailed:
                continue  # gone meanwhile
            if st in ("queued", "running"):
                return True
        return False

    deadline = time.monotonic() + 20
    while await jobs_running():
        assert time.monotonic() < deadline, "jobs still running after 20 s"
        await asyncio.sleep(0.1)
    seen = -1
    while seen != len(client.signals):
        seen = len(client.signals)
        await asyncio.sleep(0.3)

    states = ["running"] + [c["State"] for c in client.changes(TEST_PATH) if "State" in c]
    bad = [(a, b) for a, b in itertools.pairwise(states) if (a, b) not in ALLOWED_TRANSITIONS]
    assert not bad, f"transitions outside API.md's table: {bad} in {states}"
    (props,) = await client.call(TEST_PATH, PROPERTIES, "GetAll", "s", [VM])
    final = props["State"].value
    assert final == states[-1], (final, states)
    assert results.count("ok") >= 10 and len(states) >= 6, (results, states)
    assert final in PROBE, final
    member, after = PROBE[final]
    assert await _lifecycle(client, member) == "ok", f"libvirt refused {member} in {final}"
    assert await client.get(TEST_PATH, VM, "State") == after


if __name__ == "__main__":
    _address, _first, _count, _calls, _domains = sys.argv[1:]
    print(json.dumps(asyncio.run(
        _worker(_address, int(_first), int(_count), int(_calls), int(_domains)))))  # fmt: skip
