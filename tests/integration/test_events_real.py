"""Events from virsh on a real libvirtd: after a pause or resume (virsh's or neurond's own)
neurond reads only the state (one call instead of five, issue 11); every other event reads
the whole domain again. These check, through D-Bus, that the properties still follow what
libvirt says after each kind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.bus.conftest import VM, Client
from tests.harness import Daemon
from tests.integration.conftest import MakeDomain, define_xml_async, virsh
from tests.integration.test_real_libvirt import (
    OUTSIDE_CHANGE_S,
    changes,
    mark,
    virsh_pause_and_resume,
    wait_state,
)

StartNeurond = Callable[..., Daemon]


async def props(client: Client, path: str) -> dict[str, Any]:
    (body,) = await client.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [VM])
    return {k: v.value for k, v in body.items()}


async def test_pause_and_resume_keep_what_else_is_known_and_a_stop_reads_it_all(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains()
    neurond()
    since = mark(client)
    await virsh("start", dom.name)
    await wait_state(client, dom.path, "running", "booted", since, OUTSIDE_CHANGE_S)
    running = await props(client, dom.path)
    assert (running["MemoryMiB"], running["Autostart"]) == (256, False)

    # Changes that send no lifecycle event: the next boot's memory, and autostart.
    await virsh("setmaxmem", dom.name, "192M", "--config")
    await virsh("autostart", dom.name)

    async def only_the_state_moved(state: str, reason: str) -> None:
        # The running domain's memory is still 256 MiB: nothing but the state moved.
        assert await props(client, dom.path) == running | {"State": state, "StateReason": reason}

    await virsh_pause_and_resume(client, dom.path, dom.name, only_the_state_moved)

    # neurond's own Pause and Resume read only the state after the action, too.
    for method, state, reason in [("Pause", "paused", "user"), ("Resume", "running", "unpaused")]:
        await client.call(dom.path, VM, method)
        assert await props(client, dom.path) == running | {"State": state, "StateReason": reason}

    # A stop reads everything: the persistent definition's memory, and the autostart flag.
    since = mark(client)
    await virsh("destroy", dom.name)
    await wait_state(client, dom.path, "shutoff", "destroyed", since, OUTSIDE_CHANGE_S)
    await asyncio.sleep(0.3)
    after = await props(client, dom.path)
    assert (after["MemoryMiB"], after["Autostart"]) == (192, True), after
    assert any(c.get("MemoryMiB") == 192 for c in changes(client, dom.path, since))

    # A define reads everything too.
    since = mark(client)
    await define_xml_async(dom.xml.replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>"))
    for _ in range(int(OUTSIDE_CHANGE_S / 0.05)):
        if (await props(client, dom.path))["VCPUs"] == 2:
            break
        await asyncio.sleep(0.05)
    after = await props(client, dom.path)
    assert (after["VCPUs"], after["MemoryMiB"], after["State"]) == (2, 256, "shutoff"), after
    await virsh("autostart", "--disable", dom.name)
