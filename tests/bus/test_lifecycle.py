"""VM lifecycle through D-Bus: API.md's state table, its signals and its refusals.

The VM is libvirt's test driver domain "test" (running at start) behind a fresh neurond.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbus_fast import Variant

from tests.bus.conftest import ERR, TEST_PATH, VM, CallFailed, Client

# Fault hooks (neurond --test-hooks) that make the test driver's instant start take a while.
SLOW_START = "virt.start:delay:0.3,virt.get:delay:0.1"


async def vm_call(
    client: Client, member: str, signature: str = "", body: list[Any] | None = None
) -> list[Any]:
    return await client.call(TEST_PATH, VM, member, signature, body)


async def start(client: Client, **options: Variant) -> None:
    await vm_call(client, "Start", "a{sv}", [dict(options)])


async def state(client: Client) -> tuple[str, str]:
    return (
        await client.get(TEST_PATH, VM, "State"),
        await client.get(TEST_PATH, VM, "StateReason"),
    )


def state_signals(client: Client) -> list[tuple[str, str]]:
    """(State, StateReason) of every PropertiesChanged of the VM that carries a state.

    API.md: a state change is ONE PropertiesChanged carrying both properties.
    """
    out = []
    for msg in client.signals:
        if msg.member == "PropertiesChanged" and msg.path == TEST_PATH:
            assert msg.body[2] == [], f"invalidated-only properties: {msg.body[2]}"
    for change in client.changes(TEST_PATH):
        if "State" in change or "StateReason" in change:
            assert "State" in change and "StateReason" in change, (
                f"a state change split over signals: {change}"
            )
            out.append((change["State"], change["StateReason"]))
    return out


async def wait_state_signals(client: Client, expected: list[tuple[str, str]]) -> None:
    """Wait until the recorded state signals are ``expected`` (and not fewer); then compare."""
    try:
        await client.wait_for(lambda: len(state_signals(client)) >= len(expected), timeout=3)
    finally:
        await asyncio.sleep(0.05)  # let a stray extra signal arrive so the comparison sees it
    assert state_signals(client) == expected


async def expect_error(
    client: Client, name: str, member: str, signature: str = "", body: list[Any] | None = None
) -> CallFailed:
    with pytest.raises(CallFailed) as info:
        await vm_call(client, member, signature, body)
    assert info.value.name == ERR + name, info.value
    assert info.value.signature == "s"
    return info.value


async def force_off(client: Client) -> None:
    """Bring the VM to shutoff and forget the signals that took it there."""
    await vm_call(client, "ForceOff")
    await client.wait_for(lambda: ("shutoff", "destroyed") in state_signals(client))
    client.signals.clear()


# ---- the transitions --------------------------------------------------------------------


async def test_pause_and_resume(daemon: Any, client: Client) -> None:
    await vm_call(client, "Pause")
    assert await state(client) == ("paused", "user")
    await vm_call(client, "Resume")
    assert await state(client) == ("running", "unpaused")
    await wait_state_signals(client, [("paused", "user"), ("running", "unpaused")])


async def test_force_off_then_start(daemon: Any, client: Client) -> None:
    await vm_call(client, "ForceOff")
    assert await state(client) == ("shutoff", "destroyed")
    await start(client)
    assert await state(client) == ("running", "booted")
    await wait_state_signals(
        client, [("shutoff", "destroyed"), ("starting", "start"), ("running", "booted")]
    )


async def test_force_off_from_paused(daemon: Any, client: Client) -> None:
    await vm_call(client, "Pause")
    await vm_call(client, "ForceOff")
    assert await state(client) == ("shutoff", "destroyed")
    await wait_state_signals(client, [("paused", "user"), ("shutoff", "destroyed")])


@pytest.mark.parametrize("method", ["Reboot", "Reset"])
async def test_reboot_and_reset_in_running(daemon: Any, client: Client, method: str) -> None:
    await vm_call(client, method)
    assert (await state(client))[0] == "running"
    await asyncio.sleep(0.1)
    assert all(s == "running" for s, _ in state_signals(client)), state_signals(client)


async def test_start_paused_on_the_test_driver(daemon: Any, client: Client) -> None:
    """The test driver has no START_PAUSED: a typed NotSupported, and the VM stays off."""
    await force_off(client)
    try:
        await start(client, paused=Variant("b", True))
    except CallFailed as e:
        assert e.name == ERR + "NotSupported", e
        assert e.signature == "s" and e.text
        assert await state(client) == ("shutoff", "destroyed")
    else:  # a driver that can do it must show paused (user)
        assert await state(client) == ("paused", "user")


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "method", "state_name"),
    [
        ("ForceOff", "Pause", "shutoff"),
        ("", "Resume", "running"),
        ("", "Start", "running"),
        ("ForceOff", "Shutdown", "shutoff"),
        ("ForceOff", "Reboot", "shutoff"),
        ("ForceOff", "ForceOff", "shutoff"),
        ("Pause", "Pause", "paused"),
        ("Pause", "Shutdown", "paused"),
    ],
)
async def test_invalid_state(
    daemon: Any, client: Client, setup: str, method: str, state_name: str
) -> None:
    if setup:
        await vm_call(client, setup)
    before = await state(client)
    assert before[0] == state_name
    await asyncio.sleep(0.05)
    client.signals.clear()
    takes_options = method in ("Start", "Shutdown")
    signature = "a{sv}" if takes_options else ""
    body: list[Any] = [{}] if takes_options else []
    err = await expect_error(client, "InvalidState", method, signature, body)
    assert state_name in err.text
    assert "test" in err.text  # names the VM
    assert await state(client) == before
    await asyncio.sleep(0.05)
    assert state_signals(client) == []


# ---- concurrency ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 10])
async def test_concurrent_starts_start_once(start_daemon: Any, client: Client, n: int) -> None:
    # The test driver starts a domain in microseconds: the fault hooks hold the start (and the
    # reads after it) long enough that all n calls arrive while the first is in flight.
    start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": SLOW_START})
    await vm_call(client, "ForceOff")
    results = await asyncio.gather(*(start(client) for _ in range(n)), return_exceptions=True)
    assert [r for r in results if r is not None] == []
    assert await state(client) == ("running", "booted")
    await wait_state_signals(
        client, [("shutoff", "destroyed"), ("starting", "start"), ("running", "booted")]
    )


async def test_concurrent_pauses_all_succeed(start_daemon: Any, client: Client) -> None:
    start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": "virt.suspend:delay:0.3"})
    results = await asyncio.gather(
        *(vm_call(client, "Pause") for _ in range(10)), return_exceptions=True
    )
    assert [r for r in results if r != []] == []
    assert await state(client) == ("paused", "user")
    await wait_state_signals(client, [("paused", "user")])


async def test_start_shows_no_stale_state_when_libvirt_reads_are_slow(
    start_daemon: Any, client: Client
) -> None:
    """Between Start and running the VM is `starting`, never back to `shutoff`.

    A slow domain read (a busy libvirtd) must not let the stale libvirt state show through
    once the start call has returned.
    """
    start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": "virt.get:delay:0.2"})
    await vm_call(client, "ForceOff")
    await start(client)
    assert await state(client) == ("running", "booted")
    await wait_state_signals(
        client, [("shutoff", "destroyed"), ("starting", "start"), ("running", "booted")]
    )


async def test_other_methods_while_starting(start_daemon: Any, client: Client) -> None:
    """While a Start is in flight the VM is `starting`: Pause is refused naming that state,
    ForceOff is allowed (it waits the Start out, then destroys)."""
    start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": SLOW_START})
    await vm_call(client, "ForceOff")
    starting = asyncio.ensure_future(start(client))
    await client.wait_for(lambda: ("starting", "start") in state_signals(client))
    assert await state(client) == ("starting", "start")
    err = await expect_error(client, "InvalidState", "Pause")
    assert "starting" in err.text
    await vm_call(client, "ForceOff")
    await starting
    assert await state(client) == ("shutoff", "destroyed")
    await wait_state_signals(
        client,
        [
            ("shutoff", "destroyed"),
            ("starting", "start"),
            ("running", "booted"),
            ("shutoff", "destroyed"),
        ],
    )


# ---- Start options ----------------------------------------------------------------------


async def test_start_rejects_an_unknown_option(daemon: Any, client: Client) -> None:
    await force_off(client)
    err = await expect_error(
        client, "InvalidArgument", "Start", "a{sv}", [{"turbo": Variant("b", True)}]
    )
    assert "turbo" in err.text
    assert await state(client) == ("shutoff", "destroyed")
    assert state_signals(client) == []


async def test_start_rejects_paused_as_a_string(daemon: Any, client: Client) -> None:
    await force_off(client)
    err = await expect_error(
        client, "InvalidArgument", "Start", "a{sv}", [{"paused": Variant("s", "true")}]
    )
    assert "paused" in err.text
    assert await state(client) == ("shutoff", "destroyed")
    assert state_signals(client) == []


# ---- SetAutostart -----------------------------------------------------------------------


async def test_set_autostart_signals_the_property(daemon: Any, client: Client) -> None:
    assert await client.get(TEST_PATH, VM, "Autostart") is False
    await vm_call(client, "SetAutostart", "b", [True])
    await client.wait_for(lambda: {"Autostart": True} in client.changes(TEST_PATH))
    assert await client.get(TEST_PATH, VM, "Autostart") is True
    await vm_call(client, "SetAutostart", "b", [False])
    await client.wait_for(lambda: {"Autostart": False} in client.changes(TEST_PATH))
    assert await client.get(TEST_PATH, VM, "Autostart") is False
    assert [c["Autostart"] for c in client.changes(TEST_PATH) if "Autostart" in c] == [True, False]
    assert state_signals(client) == []  # SetAutostart leaves the state alone
