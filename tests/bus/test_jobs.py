"""Shutdown jobs through D-Bus: the job object, its signals and their order, options, joins.

libvirt's test driver shuts a domain off at once, so a job ends within milliseconds; the fault
hooks (neurond --test-hooks, NEUROND_FAULTS=point:effect[:arg]) stretch it where a test needs
a job in flight: `virt.shutdown:delay:S` holds the ACPI request, `virt.get:delay:S` every read
of a domain (so the job waits S seconds to see the VM off, and S more to finish).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from tests.bus.conftest import (
    ERR,
    HOOKS,
    JOB,
    MANAGER,
    MANAGER_PATH,
    NAME,
    OBJECT_MANAGER,
    PROPERTIES,
    ROOT,
    TEST_PATH,
    TEST_UUID,
    VM,
    CallFailed,
    Client,
)

FIRST_JOB = f"{ROOT}/job/1"

JOB_PROPERTY_TYPES = {
    "Operation": "s",
    "State": "s",
    "Progress": "d",
    "ProgressValid": "b",
    "Bytes": "t",
    "TotalBytes": "t",
    "Rate": "t",
    "StartTime": "t",
    "Cancelable": "b",
    "Objects": "ao",
    "StartedByUID": "u",
    "ErrorName": "s",
    "ErrorMessage": "s",
}


class Recorder:
    """Every signal, reply and error a client connection receives, in arrival order."""

    def __init__(self, client: Client) -> None:
        self.messages: list[Message] = []
        client.bus.add_message_handler(self._record)

    def _record(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL and msg.sender != "org.freedesktop.DBus":
            self.messages.append(msg)
        return False  # observe only: the reply still reaches its caller

    def index(self, predicate: Any) -> int:
        for i, m in enumerate(self.messages):
            if predicate(m):
                return i
        raise AssertionError("no such message recorded")

    def signals(self, member: str, path: str | None = None) -> list[Message]:
        return [
            m
            for m in self.messages
            if m.message_type is MessageType.SIGNAL
            and m.member == member
            and (path is None or m.path == path)
        ]

    def added(self, path: str) -> list[Message]:
        """InterfacesAdded for ``path``, wherever sent from."""
        return [m for m in self.signals("InterfacesAdded") if m.body[0] == path]

    def removed(self, path: str) -> list[Message]:
        return [m for m in self.signals("InterfacesRemoved") if m.body[0] == path]


async def call_in_order(
    client: Client,
    rec: Recorder,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> tuple[Any, int]:
    """Call; return the first result and the position of its reply among recorded messages."""
    reply = await client.bus.call(
        Message(
            destination=NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise CallFailed(reply.error_name or "", reply.body, reply.signature)
    serial = reply.reply_serial
    position = rec.index(
        lambda m: m.message_type is MessageType.METHOD_RETURN and m.reply_serial == serial
    )
    return (reply.body[0] if reply.body else None), position


async def shutdown(client: Client, **options: Variant) -> str:
    (job,) = await client.call(TEST_PATH, VM, "Shutdown", "a{sv}", [dict(options)])
    return str(job)


async def list_jobs(client: Client) -> list[str]:
    (jobs,) = await client.call(MANAGER_PATH, MANAGER, "ListJobs")
    return list(jobs)


async def job_props(client: Client, job: str) -> dict[str, Variant]:
    (props,) = await client.call(job, PROPERTIES, "GetAll", "s", [JOB])
    return dict(props)


def completed(client: Client, job: str) -> list[list[Any]]:
    return [list(m.body) for m in client.signals if m.member == "Completed" and m.path == job]


async def wait_completed(client: Client, job: str, timeout: float = 5.0) -> list[Any]:
    await client.wait_for(lambda: bool(completed(client, job)), timeout)
    (signal,) = completed(client, job)
    return signal


async def expect_error(coro: Any, name: str) -> CallFailed:
    with pytest.raises(CallFailed) as info:
        await coro
    assert info.value.name == name, info.value
    assert info.value.signature == "s" and info.value.text
    return info.value


# ---- the job object and its announcement ------------------------------------------------


async def test_job_is_announced_from_the_root_before_the_reply(daemon: Any, client: Client) -> None:
    rec = Recorder(client)
    job, reply_at = await call_in_order(client, rec, TEST_PATH, VM, "Shutdown", "a{sv}", [{}])
    assert job == FIRST_JOB
    (added,) = rec.added(job)
    assert added.path == ROOT, f"InterfacesAdded sent from {added.path}, not the root"
    assert added.interface == OBJECT_MANAGER
    assert rec.messages.index(added) < reply_at, "the reply came before the job's InterfacesAdded"
    props = added.body[1][JOB]
    assert {k: v.signature for k, v in props.items()} == JOB_PROPERTY_TYPES
    assert props["Operation"].value == "shutdown-vm"
    assert props["Objects"].value == [TEST_PATH]


async def test_job_completes_and_goes_after_linger(start_daemon: Any, client: Client) -> None:
    start_daemon(config={"jobs": {"linger_s": 0.5}})
    rec = Recorder(client)
    job = await shutdown(client)
    assert await list_jobs(client) == [job]
    assert await wait_completed(client, job) == [True, "", ""]
    done_at = time.monotonic()
    assert (await job_props(client, job))["State"].value == "completed"

    await client.wait_for(lambda: bool(rec.removed(job)), timeout=3)
    assert time.monotonic() - done_at > 0.3, "the job went before jobs.linger_s"
    (removed,) = rec.removed(job)
    assert removed.path == ROOT and removed.body[1] == [JOB]
    removed_at = rec.messages.index(removed)
    changes = rec.signals("PropertiesChanged", job)
    assert changes, "the job never signalled a property change"
    last = changes[-1]
    assert rec.messages.index(last) < removed_at
    assert rec.index(lambda m: m.member == "Completed" and m.path == job) < removed_at
    states = [c.body[1]["State"].value for c in changes if "State" in c.body[1]]
    assert states[-1] == "completed"
    progress = [c.body[1]["Progress"].value for c in changes if "Progress" in c.body[1]]
    assert progress and progress[-1] == 1.0

    await expect_error(
        client.call(job, PROPERTIES, "Get", "ss", [JOB, "State"]),
        "org.freedesktop.DBus.Error.UnknownObject",
    )
    await expect_error(client.call(job, JOB, "Cancel"), "org.freedesktop.DBus.Error.UnknownObject")
    assert await list_jobs(client) == []


async def test_job_properties_when_completed(daemon: Any, client: Client) -> None:
    before_us = time.time_ns() // 1000
    job = await shutdown(client)
    after_us = time.time_ns() // 1000
    await wait_completed(client, job)
    props = await job_props(client, job)
    assert {k: v.signature for k, v in props.items()} == JOB_PROPERTY_TYPES
    values = {k: v.value for k, v in props.items()}
    assert values["Operation"] == "shutdown-vm"
    assert values["State"] == "completed"
    assert values["Progress"] == 1.0 and values["ProgressValid"] is True
    assert values["Cancelable"] is False
    assert values["StartedByUID"] == 0
    assert before_us - 1_000_000 <= values["StartTime"] <= after_us + 1_000_000
    assert values["Objects"] == [TEST_PATH]
    assert values["ErrorName"] == "" and values["ErrorMessage"] == ""
    assert await client.get(TEST_PATH, VM, "State") == "shutoff"
    assert await client.get(TEST_PATH, VM, "StateReason") == "shutdown"
    vm_states = [(c["State"], c["StateReason"]) for c in client.changes(TEST_PATH) if "State" in c]
    assert vm_states == [("stopping", "shutdown"), ("shutoff", "shutdown")]
    (objects,) = await client.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
    assert {k: v.value for k, v in objects[job][JOB].items()} == values


async def test_job_numbers_count_up(daemon: Any, client: Client) -> None:
    first = await shutdown(client)
    await wait_completed(client, first)
    await client.call(TEST_PATH, VM, "Start", "a{sv}", [{}])
    second = await shutdown(client)
    assert (first, second) == (FIRST_JOB, f"{ROOT}/job/2")
    await wait_completed(client, second)
    assert sorted(await list_jobs(client)) == [FIRST_JOB, f"{ROOT}/job/2"]


# ---- options ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["i", "u", "t", "q"])
async def test_shutdown_timeout_in_any_integer_type(daemon: Any, client: Client, sig: str) -> None:
    job = await shutdown(client, timeout_s=Variant(sig, 30), force=Variant("b", False))
    assert job == FIRST_JOB
    assert await wait_completed(client, job) == [True, "", ""]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("timeout_s", Variant("u", 0)),
        ("timeout_s", Variant("i", 0)),
        ("timeout_s", Variant("u", 5000)),
        ("timeout_s", Variant("i", -30)),
        ("timeout_s", Variant("s", "30")),
        ("force", Variant("s", "yes")),
        ("force", Variant("i", 1)),
        ("turbo", Variant("b", True)),
    ],
)
async def test_shutdown_rejects_bad_options(
    daemon: Any, client: Client, key: str, value: Variant
) -> None:
    err = await expect_error(shutdown(client, **{key: value}), ERR + "InvalidArgument")
    assert key in err.text
    assert await list_jobs(client) == []
    assert await client.get(TEST_PATH, VM, "State") == "running"
    assert not [m for m in client.signals if m.member == "InterfacesAdded"]


# ---- joining, cancelling, failing -------------------------------------------------------


async def test_second_shutdown_during_the_acpi_request_joins(
    start_daemon: Any, client: Client
) -> None:
    start_daemon(extra_args=HOOKS, env={"NEUROND_FAULTS": "virt.shutdown:delay:0.5"})
    rec = Recorder(client)
    first, second = await asyncio.gather(shutdown(client), shutdown(client))
    assert first == second == FIRST_JOB
    assert await list_jobs(client) == [FIRST_JOB]
    await wait_completed(client, first)
    assert len(rec.signals("InterfacesAdded")) == 1


async def test_second_shutdown_while_the_job_runs_joins(start_daemon: Any, client: Client) -> None:
    start_daemon(extra_args=HOOKS, env={"NEUROND_FAULTS": "virt.get:delay:0.4"})
    rec = Recorder(client)
    job = await shutdown(client)
    assert (await job_props(client, job))["State"].value == "running"
    assert await client.get(TEST_PATH, VM, "State") == "stopping"
    assert await shutdown(client) == job
    assert await list_jobs(client) == [job]
    assert await wait_completed(client, job) == [True, "", ""]
    assert len(rec.signals("InterfacesAdded")) == 1


async def test_cancel_a_running_job(start_daemon: Any, client: Client) -> None:
    start_daemon(extra_args=HOOKS, env={"NEUROND_FAULTS": "virt.get:delay:0.4"})
    job = await shutdown(client)
    await client.call(job, JOB, "Cancel")
    success, error_name, message = await wait_completed(client, job)
    assert (success, error_name) == (False, ERR + "Cancelled")
    assert message
    values = {k: v.value for k, v in (await job_props(client, job)).items()}
    assert values["State"] == "cancelled"
    assert values["ErrorName"] == ERR + "Cancelled"
    assert values["ErrorMessage"] == message
    last = [c for c in client.changes(job) if "State" in c][-1]
    assert last["State"] == "cancelled" and last["ErrorName"] == ERR + "Cancelled"


async def test_cancel_a_finished_job_is_a_typed_error(daemon: Any, client: Client) -> None:
    job = await shutdown(client)
    await wait_completed(client, job)
    with pytest.raises(CallFailed) as info:
        await client.call(job, JOB, "Cancel")
    assert info.value.name.startswith(ERR), info.value
    assert info.value.name != ERR + "Internal"
    assert info.value.signature == "s" and "completed" in info.value.text
    assert (await job_props(client, job))["State"].value == "completed"
    assert len(completed(client, job)) == 1


async def test_libvirt_failure_fails_the_call_and_makes_no_job(
    start_daemon: Any, client: Client
) -> None:
    start_daemon(extra_args=HOOKS, env={"NEUROND_FAULTS": "virt.shutdown:libvirt"})
    err = await expect_error(shutdown(client), ERR + "VMStopFailed")
    assert "'test'" in err.text or TEST_UUID in err.text  # names the VM
    assert await list_jobs(client) == []
    assert await client.get(TEST_PATH, VM, "State") == "running"
    await asyncio.sleep(0.05)
    assert not [m for m in client.signals if m.member == "InterfacesAdded"]
    assert not [c for c in client.changes(TEST_PATH) if "State" in c]
