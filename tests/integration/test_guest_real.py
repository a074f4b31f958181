"""The guest agent and the display on a real libvirtd with the tiny guest and real qemu-ga.

Issue 7's "Done when": GuestAgent follows the agent (PropertiesChanged), GuestPing, GuestInfo
with the guest's kernel, GuestExec with raw bytes both ways, exit codes and a timeout (the
program is killed), GuestAgentUnavailable without an agent, InvalidState on a shut-off VM;
GetDisplay's vnc:// and spice:// addresses answer with the RFB greeting and a SPICE link reply.
Graphics are added to the factory's domain XML here (``with_graphics``).
"""

from __future__ import annotations

import asyncio
import struct
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, Variant

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, VM, CallFailed, Client
from tests.harness import Daemon
from tests.integration.conftest import GUEST_DIR, GuestDomain, MakeDomain, define_xml_async

StartNeurond = Callable[..., Daemon]
AGENT_CONNECTS_S = 90.0  # software emulation: ~6.5 s measured, generous for a busy host
FAST_S = 1.0


# -- helpers ---------------------------------------------------------------------------------


def with_graphics(dom: GuestDomain, kind: str) -> str:
    """The domain's XML with a ``<graphics type=kind>`` on 127.0.0.1, port chosen by libvirt."""
    root = ET.fromstring(dom.xml)
    devices = root.find("devices")
    assert devices is not None
    g = ET.SubElement(devices, "graphics", type=kind, port="-1", autoport="yes", listen="127.0.0.1")
    ET.SubElement(g, "listen", type="address", address="127.0.0.1")
    return ET.tostring(root, encoding="unicode")


def guest_kernel() -> str:
    for line in (GUEST_DIR / "manifest").read_text().splitlines():
        if line.startswith("kernel="):
            return line.split("=", 1)[1]
    raise AssertionError("the guest manifest names no kernel")


async def vm(client: Client, dom: GuestDomain, member: str, sig: str = "", *args: Any) -> Any:
    return await client.call(dom.path, VM, member, sig, list(args))


async def exec_(
    client: Client, dom: GuestDomain, argv: list[str], **options: Variant
) -> tuple[int, bytes, bytes]:
    code, out, err = await vm(client, dom, "GuestExec", "sasa{sv}", argv[0], argv[1:], options)
    return code, bytes(out), bytes(err)


async def failure(coro: Any) -> tuple[CallFailed, float]:
    started = time.monotonic()
    try:
        await coro
    except CallFailed as e:
        return e, time.monotonic() - started
    raise AssertionError("the call succeeded")


async def wait_agent(client: Client, dom: GuestDomain, value: str, since: int) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()

    def seen(m: Message) -> bool:
        return (
            m.member == "PropertiesChanged"
            and m.path == dom.path
            and "GuestAgent" in m.body[1]
            and m.body[1]["GuestAgent"].value == value
        )

    while not any(seen(m) for m in client.signals[since:]):
        if loop.time() - started > AGENT_CONNECTS_S:
            raise AssertionError(f"no GuestAgent={value} within {AGENT_CONNECTS_S} s")
        await asyncio.sleep(0.01)
    return loop.time() - started


async def display(client: Client, dom: GuestDomain) -> dict[str, Any]:
    (answer,) = await vm(client, dom, "GetDisplay")
    return {k: v.value for k, v in answer.items()}


def host_port(uri: str, scheme: str) -> tuple[str, int]:
    assert uri.startswith(f"{scheme}://"), uri
    host, _, port = uri[len(scheme) + 3 :].rpartition(":")
    return host.strip("[]"), int(port)


async def rfb_greeting(host: str, port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        return await asyncio.wait_for(reader.readexactly(12), 5)
    finally:
        writer.close()


async def spice_link_reply(host: str, port: int) -> bytes:
    """Send a SpiceLinkMess for the main channel; the reply's SpiceLinkHeader (16 bytes)."""
    # SpiceLinkMess: connection_id, channel_type (1 = main), channel_id, no caps, caps offset
    mess = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)
    header = b"REDQ" + struct.pack("<III", 2, 2, len(mess))
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(header + mess)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(16), 5)
    finally:
        writer.close()


# -- tests -----------------------------------------------------------------------------------


async def test_guest_agent_and_vnc_on_a_booted_guest(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(agent=True, define=False)
    await define_xml_async(with_graphics(dom, "vnc"))
    neurond()
    features = await client.get(MANAGER_PATH, MANAGER, "Features")
    assert {"guest-agent", "spice", "vnc"} <= set(features), features

    # Shut off: InvalidState, not a wait for an agent.
    for member, sig, args in (("GuestPing", "", []), ("GetDisplay", "", [])):
        err, took = await failure(vm(client, dom, member, sig, *args))
        assert err.name == ERR + "InvalidState" and "shutoff" in err.text, err
        assert took < FAST_S

    since = len(client.signals)
    await vm(client, dom, "Start", "a{sv}", {})
    assert await client.get(dom.path, VM, "GuestAgent") == "disconnected"
    err, took = await failure(vm(client, dom, "GuestPing"))
    assert err.name == ERR + "GuestAgentUnavailable" and took < FAST_S, err

    # VNC works while the guest boots; the port is libvirt's autoport choice.
    answer = await display(client, dom)
    assert answer["kind"] == "vnc" and set(answer) == {"kind", "uri"}, answer
    host, port = host_port(answer["uri"], "vnc")
    assert host == "127.0.0.1" and port >= 5900
    assert await rfb_greeting(host, port) == b"RFB 003.008\n"

    took = await wait_agent(client, dom, "connected", since)
    print(f"agent connected {took:.1f} s after Start")
    await vm(client, dom, "GuestPing")

    (info,) = await vm(client, dom, "GuestInfo")
    info = {k: v.value for k, v in info.items()}
    assert info["kernel"] == guest_kernel()
    assert info["os"] == "neurond test guest (busybox)"
    assert info["hostname"] == "nrdtest"
    assert info["agent_version"].startswith("7."), info

    assert await exec_(client, dom, ["/bin/busybox", "echo", "hi"]) == (0, b"hi\n", b"")
    # NUL and invalid UTF-8 come back byte for byte.
    raw = await exec_(client, dom, ["/bin/busybox", "sh", "-c", "printf '\\0\\377'"])
    assert raw == (0, b"\x00\xff", b"")
    payload = bytes(range(256)) * 64
    cat = await exec_(client, dom, ["/bin/busybox", "cat"], stdin=Variant("ay", payload))
    assert cat == (0, payload, b"")
    failed = await exec_(client, dom, ["/bin/busybox", "sh", "-c", "echo oops >&2; exit 3"])
    assert failed == (3, b"", b"oops\n")
    killed = await exec_(client, dom, ["/bin/busybox", "sh", "-c", "kill -TERM $$"])
    assert killed[0] == 128 + 15

    # libvirt carries at most 4 MiB per agent message (base64 inside): 2.5 MiB of output come
    # back whole; 4 MiB fail with OperationFailed naming the limit, and the connection stays.
    size = 5 * 2**19
    head = ["/bin/busybox", "head", "-c"]
    assert await exec_(client, dom, [*head, str(size), "/dev/zero"]) == (0, bytes(size), b"")
    mark = len(client.signals)
    err, _ = await failure(exec_(client, dom, [*head, str(4 * 2**20), "/dev/zero"]))
    assert err.name == ERR + "OperationFailed" and "larger than libvirt can carry" in err.text
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True
    assert not [m for m in client.signals[mark:] if m.path == MANAGER_PATH]
    assert await exec_(client, dom, ["/bin/busybox", "echo", "hi"]) == (0, b"hi\n", b"")

    err, _ = await failure(exec_(client, dom, ["/nonexistent/program"]))
    assert err.name == ERR + "OperationFailed" and "/nonexistent/program" in err.text, err

    # A timeout: Timeout within the asked time (plus the kill), and the program is gone.
    started = time.monotonic()
    err, _ = await failure(
        exec_(client, dom, ["/bin/busybox", "sleep", "60"], timeout_s=Variant("u", 2))
    )
    took = time.monotonic() - started
    assert err.name == ERR + "Timeout" and "within 2 s" in err.text, err
    assert 2.0 <= took < 6.0, took
    print(f"GuestExec timeout answered after {took:.2f} s")
    # (the guest's init sleeps too: look for this very command line)
    ps = "ps | grep -q '[s]leep 61' && echo alive || echo gone"
    assert await exec_(client, dom, ["/bin/busybox", "sh", "-c", ps]) == (0, b"gone\n", b"")

    # The agent goes with the guest.
    since = len(client.signals)
    await vm(client, dom, "ForceOff")
    await wait_agent(client, dom, "disconnected", since)


async def test_spice_and_no_agent_on_a_booted_guest(
    neurond: StartNeurond, client: Client, domains: MakeDomain
) -> None:
    dom = domains(agent=False, define=False)
    await define_xml_async(with_graphics(dom, "spice"))
    neurond()
    await vm(client, dom, "Start", "a{sv}", {})
    assert await client.get(dom.path, VM, "GuestAgent") == "none"
    for member, sig, args in (
        ("GuestPing", "", []),
        ("GuestInfo", "", []),
        ("GuestExec", "sasa{sv}", ["/bin/busybox", ["true"], {}]),
    ):
        err, took = await failure(vm(client, dom, member, sig, *args))
        assert err.name == ERR + "GuestAgentUnavailable" and "no guest agent" in err.text, err
        assert took < FAST_S

    answer = await display(client, dom)
    assert answer["kind"] == "spice" and set(answer) == {"kind", "uri"}, answer
    host, port = host_port(answer["uri"], "spice")
    reply = await spice_link_reply(host, port)
    assert reply[:4] == b"REDQ", reply

    await vm(client, dom, "Pause")
    assert (await display(client, dom))["kind"] == "spice"  # GetDisplay also when paused
    err, _ = await failure(vm(client, dom, "GuestPing"))
    assert err.name == ERR + "InvalidState" and "paused" in err.text
