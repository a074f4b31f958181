"""GetDisplay and the Guest* methods through D-Bus on libvirt's test driver.

A node file holds domains with Looking Glass + SPICE, SPICE only, VNC only and no graphics
(fixed ports: the test driver assigns none for autoport), one with an agent channel, one shut
off and one paused. The Looking Glass file is created in /dev/shm under a random UUID's name
and removed after the test. The test driver has no guest agent: the Guest* answers here are
the ones given without asking libvirt (state and GuestAgent rules, argument checks); the real
agent is exercised in tests/integration/test_guest_real.py.
"""

from __future__ import annotations

import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, ROOT, VM, CallFailed, Client
from tests.harness import Daemon, PrivateBus, busctl, node_uri

NAME = "org.neuronos.Neuron1"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
LG_SIZE = 32 * 2**20
FAST_S = 1.0  # "without waiting": far below timeouts.guest_agent_s (10 s)


@dataclass(frozen=True)
class Dom:
    name: str
    uuid: str

    @property
    def path(self) -> str:
        return f"{ROOT}/vm/{self.uuid.replace('-', '_')}"

    @property
    def shm(self) -> Path:
        return Path("/dev/shm") / f"looking-glass-{self.uuid}"


def _domain(node: ET.Element, name: str, state: str = "") -> tuple[Dom, ET.Element]:
    dom = Dom(name, str(uuidlib.uuid4()))
    el = ET.SubElement(node, "domain", type="test")
    ET.SubElement(el, "name").text = name
    ET.SubElement(el, "uuid").text = dom.uuid
    ET.SubElement(el, "memory", unit="MiB").text = "64"
    ET.SubElement(el, "vcpu").text = "1"
    ET.SubElement(ET.SubElement(el, "os"), "type", arch="x86_64").text = "hvm"
    if state:
        ET.SubElement(el, f"{{{TEST_NS}}}runstate").text = state
    return dom, ET.SubElement(el, "devices")


def _graphics(devices: ET.Element, kind: str, port: int, listen: str) -> None:
    g = ET.SubElement(devices, "graphics", type=kind, port=str(port), autoport="no", listen=listen)
    ET.SubElement(g, "listen", type="address", address=listen)


def _looking_glass(devices: ET.Element, dom: Dom) -> None:
    shmem = ET.SubElement(devices, "shmem", name=f"looking-glass-{dom.uuid}")
    ET.SubElement(shmem, "model", type="ivshmem-plain")
    ET.SubElement(shmem, "size", unit="M").text = str(LG_SIZE // 2**20)


def _agent_channel(devices: ET.Element) -> None:
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")


@dataclass
class Node:
    uri: str
    lg: Dom
    spice: Dom
    vnc: Dom
    bare: Dom
    agent: Dom
    off: Dom
    paused: Dom


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    ET.register_namespace("test", TEST_NS)
    root = ET.Element("node")
    lg, devices = _domain(root, "lg-spice")
    _looking_glass(devices, lg)
    _graphics(devices, "spice", 5911, "127.0.0.1")
    spice, devices = _domain(root, "spice-only")
    _graphics(devices, "spice", 5912, "0.0.0.0")
    vnc, devices = _domain(root, "vnc-only")
    _graphics(devices, "vnc", 5901, "127.0.0.1")
    bare, _ = _domain(root, "no-graphics")
    agent, devices = _domain(root, "with-agent")
    _agent_channel(devices)
    _graphics(devices, "vnc", 5902, "::")
    off, devices = _domain(root, "shut-off", state="5")
    _agent_channel(devices)
    _graphics(devices, "vnc", 5903, "127.0.0.1")
    paused, devices = _domain(root, "paused", state="3")
    _graphics(devices, "vnc", 5904, "127.0.0.1")
    path = tmp_path / "node.xml"
    ET.ElementTree(root).write(path, encoding="unicode")
    n = Node(node_uri(path), lg, spice, vnc, bare, agent, off, paused)
    try:
        yield n
    finally:
        n.lg.shm.unlink(missing_ok=True)


@pytest.fixture
def neurond(start_daemon: Callable[..., Daemon], node: Node) -> Daemon:
    return start_daemon(libvirt_uri=node.uri)


def make_shm(path: Path, size: int = LG_SIZE, mode: int = 0o660) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse on tmpfs: costs no memory
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


async def display(client: Client, dom: Dom) -> dict[str, Any]:
    (answer,) = await client.call(dom.path, VM, "GetDisplay")
    return {k: v.value for k, v in answer.items()}


async def failure(client: Client, dom: Dom, member: str, sig: str = "", body: Any = None) -> Any:
    started = time.monotonic()
    with pytest.raises(CallFailed) as e:
        await client.call(dom.path, VM, member, sig, body)
    assert e.value.signature == "s"
    return e.value, time.monotonic() - started


# ---- GetDisplay ----------------------------------------------------------------------------


async def test_looking_glass_when_its_file_is_right(
    neurond: Daemon, client: Client, node: Node
) -> None:
    make_shm(node.lg.shm)
    assert await display(client, node.lg) == {
        "kind": "looking-glass",
        "shm_path": f"/dev/shm/looking-glass-{node.lg.uuid}",
    }


async def test_looking_glass_falls_back_to_spice_saying_why(
    neurond: Daemon, client: Client, node: Node
) -> None:
    answer = await display(client, node.lg)
    assert answer["kind"] == "spice" and answer["uri"] == "spice://127.0.0.1:5911"
    assert set(answer) == {"kind", "uri", "fallback_reason"}
    assert str(node.lg.shm) in answer["fallback_reason"]
    assert "does not exist" in answer["fallback_reason"]

    make_shm(node.lg.shm, size=LG_SIZE // 2)  # wrong size
    reason = (await display(client, node.lg))["fallback_reason"]
    assert f"{LG_SIZE // 2} bytes, not {LG_SIZE}" in reason
    node.lg.shm.unlink()

    make_shm(node.lg.shm, mode=0o600)  # the group (kvm, the desktop user) cannot use it
    answer = await display(client, node.lg)
    assert answer["kind"] == "spice" and "mode 0600" in answer["fallback_reason"]
    node.lg.shm.unlink()

    make_shm(node.lg.shm, mode=0o666)  # anyone could write into the guest's frame buffer
    answer = await display(client, node.lg)
    assert answer["kind"] == "spice" and "writable by every user" in answer["fallback_reason"]
    node.lg.shm.unlink()

    node.lg.shm.symlink_to("/dev/null")
    answer = await display(client, node.lg)
    assert answer["kind"] == "spice" and "not a regular file" in answer["fallback_reason"]


async def test_spice_vnc_and_none(neurond: Daemon, client: Client, node: Node) -> None:
    # A wildcard listener is reached on loopback; the port is the TCP port, not a display number.
    assert await display(client, node.spice) == {"kind": "spice", "uri": "spice://127.0.0.1:5912"}
    assert await display(client, node.vnc) == {"kind": "vnc", "uri": "vnc://127.0.0.1:5901"}
    assert await display(client, node.agent) == {"kind": "vnc", "uri": "vnc://[::1]:5902"}
    answer = await display(client, node.bare)
    assert answer["kind"] == "none" and set(answer) == {"kind", "fallback_reason"}
    assert "no display device" in answer["fallback_reason"]


async def test_get_display_by_state(neurond: Daemon, client: Client, node: Node) -> None:
    assert await display(client, node.paused) == {"kind": "vnc", "uri": "vnc://127.0.0.1:5904"}
    err, _ = await failure(client, node.off, "GetDisplay")
    assert err.name == ERR + "InvalidState" and "shutoff" in err.text


# ---- the guest agent, as far as the test driver goes --------------------------------------


GUEST_CALLS: list[tuple[str, str, list[Any]]] = [
    ("GuestPing", "", []),
    ("GuestInfo", "", []),
    ("GuestExec", "sasa{sv}", ["/bin/true", [], {}]),
]


@pytest.mark.parametrize(("member", "sig", "body"), GUEST_CALLS)
async def test_guest_calls_fail_at_once_without_a_connected_agent(
    neurond: Daemon, client: Client, node: Node, member: str, sig: str, body: list[Any]
) -> None:
    assert await client.get(node.bare.path, VM, "GuestAgent") == "none"
    err, took = await failure(client, node.bare, member, sig, body)
    assert err.name == ERR + "GuestAgentUnavailable" and "no guest agent channel" in err.text
    assert took < FAST_S

    assert await client.get(node.agent.path, VM, "GuestAgent") == "disconnected"
    err, took = await failure(client, node.agent, member, sig, body)
    assert err.name == ERR + "GuestAgentUnavailable" and "not connected" in err.text
    assert took < FAST_S


@pytest.mark.parametrize(("member", "sig", "body"), GUEST_CALLS)
async def test_guest_calls_need_a_running_vm(
    neurond: Daemon, client: Client, node: Node, member: str, sig: str, body: list[Any]
) -> None:
    for dom, state in ((node.off, "shutoff"), (node.paused, "paused")):
        err, _ = await failure(client, dom, member, sig, body)
        assert err.name == ERR + "InvalidState" and state in err.text


@pytest.mark.parametrize(
    ("path", "args", "options", "words"),
    [
        ("bin/busybox", [], {}, "not an absolute path"),
        ("", [], {}, "not an absolute path"),
        ("busybox.exe", [], {}, "not an absolute path"),
        ("/bin/true", ["x" * 5000], {}, "longer than"),
        ("/bin/true", ["a"] * 300, {}, "Too many arguments"),
        ("/bin/true", [], {"env": Variant("as", [])}, "Unknown option 'env'"),
        ("/bin/true", [], {"stdin": Variant("s", "text")}, "byte array"),
        ("/bin/true", [], {"stdin": Variant("ay", bytes(2 * 2**20 + 1))}, "2097152 bytes"),
        ("/bin/true", [], {"timeout_s": Variant("u", 0)}, "between 1 and 20"),
        ("/bin/true", [], {"timeout_s": Variant("u", 3600)}, "between 1 and 20"),
    ],
)
async def test_guest_exec_checks_its_arguments_first(
    neurond: Daemon,
    client: Client,
    node: Node,
    path: str,
    args: list[str],
    options: dict[str, Variant],
    words: str,
) -> None:
    err, _ = await failure(client, node.bare, "GuestExec", "sasa{sv}", [path, args, options])
    assert err.name == ERR + "InvalidArgument" and words in err.text, err.text


async def test_windows_paths_are_absolute_too(neurond: Daemon, client: Client, node: Node) -> None:
    for path in ("C:\\Windows\\System32\\cmd.exe", "c:/tools/x.exe", "\\\\server\\share\\x.exe"):
        err, _ = await failure(client, node.bare, "GuestExec", "sasa{sv}", [path, [], {}])
        assert err.name == ERR + "GuestAgentUnavailable", (path, err.text)


async def test_stdin_and_timeout_options_are_accepted(
    neurond: Daemon, client: Client, node: Node
) -> None:
    options = {"stdin": Variant("ay", b"\0\xff"), "timeout_s": Variant("q", 5)}
    err, _ = await failure(client, node.bare, "GuestExec", "sasa{sv}", ["/bin/cat", [], options])
    assert err.name == ERR + "GuestAgentUnavailable"


async def test_features_on_the_test_driver(neurond: Daemon, client: Client) -> None:
    """The test driver has no agent command and no domain capabilities: none of the four."""
    features = await client.get(MANAGER_PATH, MANAGER, "Features")
    assert not {"guest-agent", "spice", "vnc", "looking-glass"} & set(features)


def test_calls_need_their_actions(private_bus: PrivateBus, neurond: Daemon, node: Node) -> None:
    """uid 65534 without polkit: PermissionDenied naming vm-console, guest and guest-exec."""
    cases = [
        ("GetDisplay", [], "vm-console"),
        ("GuestPing", [], "guest"),
        ("GuestInfo", [], "guest"),
        ("GuestExec", ["sasa{sv}", "/bin/true", "0", "0"], "guest-exec"),
    ]
    for member, args, action in cases:
        out = busctl(private_bus, "call", NAME, node.spice.path, VM, member, *args, as_nobody=True)
        assert out.returncode != 0
        assert f"org.neuronos.neuron1.{action} " in out.stderr, out.stderr
