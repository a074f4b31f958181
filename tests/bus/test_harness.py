"""Tests of tests/harness.py itself and of the bus policy file; none of them needs neurond."""

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    BUS_NAME,
    POLICY_FILE,
    Daemon,
    PrivateBus,
    busctl,
    gdbus,
    make_test_node_xml,
    node_uri,
    run_as_nobody,
    to_toml,
)

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
MANAGER_PATH = "/org/neuronos/Neuron1/Manager"

# Stands in for neurond: owns the name and exports one allowed and one unlisted interface.
FAKE_SERVICE = """
import asyncio
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

class Iface(ServiceInterface):
    @method()
    def Ping(self) -> "s":
        return "pong"

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    bus.export("/org/neuronos/Neuron1/Manager", Iface("org.neuronos.Neuron1.Manager"))
    bus.export("/org/neuronos/Neuron1/Manager", Iface("org.example.Unlisted"))
    await bus.request_name("org.neuronos.Neuron1")
    await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


def request_name(bus: PrivateBus, as_nobody: bool) -> subprocess.CompletedProcess[str]:
    return gdbus(
        bus, "call", "--dest", DBUS[0], "--object-path", DBUS[1],
        "--method", f"{DBUS[2]}.RequestName", BUS_NAME, "0",
        as_nobody=as_nobody,
    )  # fmt: skip


def test_bus_starts_and_busctl_lists_it(bus: PrivateBus) -> None:
    assert bus.address.startswith(f"unix:path={bus.socket_path},")
    out = busctl(bus, "list")
    assert out.returncode == 0, out.stderr
    assert "org.freedesktop.DBus" in out.stdout


def test_nobody_can_call_the_bus(bus: PrivateBus) -> None:
    out = busctl(bus, "call", *DBUS, "ListNames", as_nobody=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("as ")


def test_policy_file_is_in_the_includedir(bus: PrivateBus) -> None:
    installed = bus.policy_dir / POLICY_FILE.name
    assert installed.read_bytes() == POLICY_FILE.read_bytes()
    assert f"<includedir>{bus.policy_dir}</includedir>" in bus.config_path.read_text()


def test_only_root_may_own_the_name(bus: PrivateBus) -> None:
    denied = request_name(bus, as_nobody=True)
    assert denied.returncode != 0
    assert "org.freedesktop.DBus.Error.AccessDenied" in denied.stderr
    granted = request_name(bus, as_nobody=False)
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.strip() == "(uint32 1,)"  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER


def test_without_the_policy_file_even_root_may_not_own() -> None:
    with PrivateBus(install_policy=False) as bare:
        out = request_name(bare, as_nobody=False)
    assert "org.freedesktop.DBus.Error.AccessDenied" in out.stderr


def test_everyone_may_call_the_listed_interfaces_only(bus: PrivateBus) -> None:
    service = subprocess.Popen([sys.executable, "-c", FAKE_SERVICE], env=bus.env())
    try:
        deadline = time.monotonic() + 15
        while busctl(bus, "status", BUS_NAME).returncode != 0:
            assert service.poll() is None, "fake service exited"
            assert time.monotonic() < deadline, "fake service never owned the name"
            time.sleep(0.05)

        def call(interface: str, member: str) -> subprocess.CompletedProcess[str]:
            return busctl(bus, "call", BUS_NAME, MANAGER_PATH, interface, member, as_nobody=True)

        allowed = call("org.neuronos.Neuron1.Manager", "Ping")
        assert (allowed.returncode, allowed.stdout) == (0, 's "pong"\n'), allowed.stderr
        peer = call("org.freedesktop.DBus.Peer", "Ping")
        assert peer.returncode == 0, peer.stderr
        introspect = call("org.freedesktop.DBus.Introspectable", "Introspect")
        assert introspect.returncode == 0, introspect.stderr
        unlisted = call("org.example.Unlisted", "Ping")
        assert unlisted.returncode != 0
        assert "Access denied" in unlisted.stderr
    finally:
        service.kill()
        service.wait()


def test_the_bus_sees_a_setpriv_client_as_uid_65534(bus: PrivateBus) -> None:
    # A client that stays connected (gdbus monitor) so the bus can be asked about it.
    cmd = run_as_nobody(["gdbus", "monitor", "--system", "--dest", "org.freedesktop.DBus"])
    client = subprocess.Popen(cmd, env=bus.env(), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            out = busctl(bus, "list", "--no-legend", "--unique")
            users = {line.split()[3] for line in out.stdout.splitlines()}
            if "nobody" in users:
                break
            assert client.poll() is None, "gdbus monitor exited"
            assert time.monotonic() < deadline, out.stdout
            time.sleep(0.05)
    finally:
        client.kill()
        client.wait()


def test_stop_removes_the_directory() -> None:
    bus = PrivateBus().start()
    directory = bus.dir
    bus.stop()
    assert not directory.exists()
    bus.stop()  # twice is fine


def test_1000_domain_node_file_loads_in_virsh(tmp_path: Path) -> None:
    node = tmp_path / "node.xml"
    domains = make_test_node_xml(node, 1000, running_every=4)
    assert [d.name for d in domains[:2]] == ["vm0000", "vm0001"]
    assert len({d.uuid for d in domains}) == 1000

    def virsh(*args: str) -> list[str]:
        out = subprocess.run(
            ["virsh", "-c", node_uri(node), *args], capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    assert sorted(virsh("list", "--all", "--name")) == [d.name for d in domains]
    assert sorted(virsh("list", "--state-running", "--name")) == [
        d.name for d in domains if d.running
    ]
    assert len([d for d in domains if d.running]) == 250
    assert virsh("domuuid", "vm0999") == [domains[999].uuid]


def test_toml_writer_round_trips() -> None:
    data = {
        "libvirt_uri": "test:///default",
        "storage": {"iso_roots": ["/a", '/b "q"'], "image_dir": "/x/ü"},
        "authorization": {"polkit": False},
        "timeouts": {"call_s": 5, "ratio": 0.5},
    }
    assert tomllib.loads(to_toml(data)) == data


def test_daemon_config_defaults_and_overrides(bus: PrivateBus) -> None:
    daemon = Daemon(bus, config={"storage": {"iso_roots": ["/isos"]}, "jobs": {"linger_s": 1}})
    try:
        config = tomllib.loads(daemon.config_path.read_text())
        assert config == {
            "storage": {
                "image_dir": str(daemon.image_dir),
                "state_dir": str(daemon.state_dir),
                "iso_roots": ["/isos"],
            },
            "authorization": {"polkit": False},
            "jobs": {"linger_s": 1},
        }
        assert daemon.cmd[1:4] == ["-m", "neurond", "--system"]
        assert daemon.env["DBUS_SYSTEM_BUS_ADDRESS"] == bus.address
    finally:
        daemon.close()
    assert not daemon.dir.exists()


# A stand-in for neurond speaking the sd_notify protocol, to test Daemon's bookkeeping.
FAKE_NOTIFIER = """
import os, signal, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def notify(msg):
    sock.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
signal.signal(signal.SIGTERM, lambda *_: (notify("STOPPING=1"), sys.exit(3)))
print("starting", file=sys.stderr, flush=True)
notify("STATUS=Starting")
notify("READY=1\\nSTATUS=Serving")
while True:
    signal.pause()
"""


def test_daemon_waits_for_ready_and_records_notifications(bus: PrivateBus) -> None:
    with Daemon(bus, wrap=lambda cmd: [sys.executable, "-c", FAKE_NOTIFIER]) as daemon:
        assert daemon.notifications[:3] == ["STATUS=Starting", "READY=1", "STATUS=Serving"]
        assert daemon.stop(signal.SIGTERM, timeout=10) == 3
        assert daemon.notifications[-1] == "STOPPING=1"
        assert "starting" in daemon.stderr_text()


def test_daemon_that_exits_early_fails_start_with_its_stderr(bus: PrivateBus) -> None:
    crash = [sys.executable, "-c", "import sys; sys.exit('boom: no config')"]
    daemon = Daemon(bus, wrap=lambda cmd: crash)
    try:
        with pytest.raises(RuntimeError, match="boom: no config"):
            daemon.start(timeout=10)
    finally:
        daemon.close()


def test_daemon_start_timeout_kills_the_process(bus: PrivateBus) -> None:
    daemon = Daemon(bus, wrap=lambda cmd: ["sleep", "60"])
    try:
        with pytest.raises(TimeoutError):
            daemon.start(timeout=0.3)
        assert daemon.proc is not None and daemon.proc.returncode == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):
            os.kill(daemon.pid, 0)
    finally:
        daemon.close()
