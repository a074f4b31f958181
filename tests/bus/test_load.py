"""Regression tests for dbus-fast's full-socket fault (TESTING.md, Known library faults).

dbus-fast 5.2.0 drops the whole bus connection when a write finds the socket full: its writer
takes ``BlockingIOError`` for a fatal error, and a message scheduled while another is half
written is written at once, into the full socket. neurond replaces the writer
(``neurond.bus.writer.install``). Here:

- neurond on a 1,000-domain test node answers 50 concurrent ``GetManagedObjects`` (about
  440 KB each) from one connection and from 50 connections, and keeps its bus connection;
- the same while the bus daemon is stalled (SIGSTOP for a second, found through
  ``GetConnectionUnixProcessID``) with all 50 replies due: neurond's socket is full for sure
  and every reply still arrives intact;
- the stalled-bus test fails for neurond with the fix switched off (it loses its bus);
- a bare dbus-fast service shows the library fault itself: without ``install`` 50 concurrent
  256 KB replies kill its connection, with ``install`` the same load is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests.bus.conftest import MANAGER, MANAGER_PATH, NAME, ROOT, VM
from tests.harness import (
    REPO_ROOT,
    Daemon,
    NodeDomain,
    PrivateBus,
    make_test_node_xml,
    node_uri,
)

N_DOMAINS = 1000
N_CALLS = 50
CALL_TIMEOUT_S = 30.0
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


def gmo() -> Message:
    return Message(destination=NAME, path=ROOT, interface=OBJECT_MANAGER,
                   member="GetManagedObjects")  # fmt: skip


def vm_path(uuid: str) -> str:
    return f"{ROOT}/vm/{uuid.replace('-', '_')}"


def check_objects(reply: Message | BaseException, domains: list[NodeDomain]) -> str:
    """ "" when ``reply`` is a complete, correct GetManagedObjects answer, else what is wrong."""
    if isinstance(reply, BaseException):
        return f"no reply: {reply!r}"
    if reply.message_type is not MessageType.METHOD_RETURN:
        return f"error {reply.error_name}: {reply.body}"
    if reply.signature != "a{oa{sa{sv}}}":
        return f"signature {reply.signature}"
    objects = reply.body[0]
    if len(objects) != len(domains) + 1:
        return f"{len(objects)} objects, want {len(domains) + 1}"
    if MANAGER not in objects.get(MANAGER_PATH, {}):
        return "no Manager object"
    for dom in domains:
        props = objects.get(vm_path(dom.uuid), {}).get(VM)
        if props is None:
            return f"no object for {dom.name}"
        got = (props["Name"].value, props["UUID"].value, props["State"].value)
        want = (dom.name, dom.uuid, "running" if dom.running else "shutoff")
        if got != want:
            return f"{vm_path(dom.uuid)}: {got}, want {want}"
    return ""


@pytest.fixture
def node(tmp_path: Path) -> tuple[str, list[NodeDomain]]:
    domains = make_test_node_xml(tmp_path / "node.xml", N_DOMAINS)
    return node_uri(tmp_path / "node.xml"), domains


@pytest.fixture
async def connections(private_bus: PrivateBus) -> AsyncIterator[list[MessageBus]]:
    buses = [await MessageBus(bus_address=private_bus.address).connect() for _ in range(N_CALLS)]
    yield buses
    for bus in buses:
        bus.disconnect()


async def call_all(buses: list[MessageBus]) -> list[Message | BaseException]:
    """One GetManagedObjects per entry of ``buses`` (which may repeat one connection), at once."""
    calls = [asyncio.wait_for(bus.call(gmo()), CALL_TIMEOUT_S) for bus in buses]
    return await asyncio.gather(*calls, return_exceptions=True)


async def assert_daemon_survived(daemon: Daemon, bus: MessageBus) -> None:
    reply = await asyncio.wait_for(bus.call(Message(
        destination=NAME, path=MANAGER_PATH, interface=MANAGER, member="ListVMs")), 10)  # fmt: skip
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
    assert len(reply.body[0]) == N_DOMAINS
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr_text()[-3000:]
    assert "bus connection was lost" not in daemon.stderr_text()


def report(replies: list[Message | BaseException], domains: list[NodeDomain]) -> list[str]:
    return [f"call {i}: {p}" for i, r in enumerate(replies) if (p := check_objects(r, domains))]


async def test_50_concurrent_calls_on_one_connection(
    node: tuple[str, list[NodeDomain]],
    start_daemon: Callable[..., Daemon],
    connections: list[MessageBus],
) -> None:
    uri, domains = node
    d = start_daemon(libvirt_uri=uri)
    one = connections[0]
    replies = await call_all([one] * N_CALLS)
    problems = report(replies, domains)
    assert not problems, "\n".join(problems[:10])
    await assert_daemon_survived(d, one)


async def test_50_concurrent_calls_on_50_connections(
    node: tuple[str, list[NodeDomain]],
    start_daemon: Callable[..., Daemon],
    connections: list[MessageBus],
) -> None:
    uri, domains = node
    d = start_daemon(libvirt_uri=uri)
    replies = await call_all(connections)
    problems = report(replies, domains)
    assert not problems, "\n".join(problems[:10])
    await assert_daemon_survived(d, connections[0])


async def bus_daemon_pid(bus: MessageBus) -> int:
    """The dbus-daemon's pid, as the bus itself tells it."""
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetConnectionUnixProcessID",
        signature="s", body=["org.freedesktop.DBus"]))  # fmt: skip
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
    pid = reply.body[0]
    assert isinstance(pid, int) and pid > 1
    return pid


@contextlib.contextmanager
def stalled(pid: int) -> Iterator[None]:
    """The bus daemon stopped for the block: it reads nothing, so neurond's socket fills up."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# Every GetManagedObjects waits REPLY_DELAY_S in neurond, so all 50 calls are in before the
# stall begins (STALL_AT_S) and all replies are written during it, into a socket nobody reads
# (building 50 replies of 1,000 VMs takes up to about 0.8 s here; the stall lasts STALL_S).
REPLY_DELAY_S = 1.0
STALL_AT_S = 0.5
STALL_S = 2.5
STALL_HOOKS: dict[str, Any] = {
    "extra_args": ["--test-hooks"],
    "env": {"NEUROND_FAULTS": f"bus.GetManagedObjects:delay:{REPLY_DELAY_S}"},
}


async def load_with_stalled_bus(
    daemon: Daemon, buses: list[MessageBus]
) -> list[Message | BaseException]:
    # neurond learns every caller's uid first (a bus round trip, which the stall would hold up).
    for bus in set(buses):
        await assert_daemon_survived(daemon, bus)
    bus_pid = await bus_daemon_pid(buses[0])

    calls = asyncio.ensure_future(call_all(buses))
    await asyncio.sleep(STALL_AT_S)
    with stalled(bus_pid):
        await asyncio.sleep(STALL_S)
    return await calls


@pytest.mark.parametrize("shared", [True, False], ids=["one-connection", "50-connections"])
async def test_replies_survive_a_stalled_bus(
    shared: bool,
    node: tuple[str, list[NodeDomain]],
    start_daemon: Callable[..., Daemon],
    connections: list[MessageBus],
) -> None:
    uri, domains = node
    d = start_daemon(libvirt_uri=uri, **STALL_HOOKS)
    replies = await load_with_stalled_bus(d, [connections[0]] * N_CALLS if shared else connections)
    problems = report(replies, domains)
    assert not problems, "\n".join(problems[:10]) + "\n" + d.stderr_text()[-3000:]
    await assert_daemon_survived(d, connections[0])


# neurond with its fix switched off: the same program, with writer.install made a no-op.
WITHOUT_FIX = (
    "import sys, neurond.bus.writer as w; w.install = lambda bus: None; "
    "from neurond.daemon import main; sys.exit(main(sys.argv[1:]))"
)


def without_fix(cmd: list[str]) -> list[str]:
    assert cmd[1:3] == ["-m", "neurond"], cmd
    return [cmd[0], "-c", WITHOUT_FIX, *cmd[3:]]


async def test_the_stalled_bus_test_fails_without_the_fix(
    node: tuple[str, list[NodeDomain]],
    start_daemon: Callable[..., Daemon],
    connections: list[MessageBus],
) -> None:
    """Proves the test above can fail: without the writer fix neurond loses its bus."""
    uri, domains = node
    d = start_daemon(libvirt_uri=uri, wrap=without_fix, **STALL_HOOKS)
    replies = await load_with_stalled_bus(d, [connections[0]] * N_CALLS)
    assert report(replies, domains), "every reply arrived although the fix was off"
    assert d.proc is not None
    code = await asyncio.to_thread(d.proc.wait, 10)
    assert code != 0
    assert "bus connection was lost" in d.stderr_text(), d.stderr_text()[-3000:]


# ---- the library fault itself, on a bare dbus-fast service ------------------------------

# A dbus-fast service with one method returning 256 KB. The replies are held until all 50
# calls are in (plus HOLD_S) and then sent in one go, as when many handlers finish together.
# The bus daemon is stalled meanwhile, so the first reply surely fills the socket and the next
# is written into the full socket at once. (Without the stall the bus daemon, on another core,
# sometimes drains the socket between two replies: about 1 run in 10 survived here.)
BARE_SERVICE = """
import asyncio, sys
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

N = int(sys.argv[3])
HOLD_S = float(sys.argv[4])

class Big(ServiceInterface):
    def __init__(self):
        super().__init__("org.example.Big")
        self.arrived = 0
        self.all_in = asyncio.Event()

    @method()
    async def Get(self, n: "u") -> "s":
        self.arrived += 1
        if self.arrived >= N:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 10)
        await asyncio.sleep(HOLD_S)
        return f"{n:08d}" * (32 * 1024)  # 256 KiB, different per call

async def main(address, patched):
    bus = await MessageBus(bus_address=address).connect()
    if patched:
        from neurond.bus import writer
        writer.install(bus)
    bus.export("/big", Big())
    print(bus.unique_name, flush=True)
    try:
        await bus.wait_for_disconnect()
    except Exception as e:
        print("DISCONNECTED", repr(e), flush=True)
        sys.exit(3)
    print("DISCONNECTED", flush=True)
    sys.exit(3)

asyncio.run(main(sys.argv[1], sys.argv[2] == "patched"))
"""
BARE_HOLD_S = 0.5
# The stock policy denies method calls to names without a policy file: allow them here.
OPEN_POLICY = '<policy context="default"><allow send_type="method_call"/></policy>'


def expected_big(n: int) -> str:
    return f"{n:08d}" * (32 * 1024)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


async def run_bare_service(patched: bool, tmp_path: Path) -> dict[str, Any]:
    """Load the bare service with 50 concurrent calls; what happened to calls and service."""
    with PrivateBus(extra_config=OPEN_POLICY) as bus:
        stderr_path = tmp_path / f"service-{'patched' if patched else 'unpatched'}.err"
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-c", BARE_SERVICE, bus.address,
                 "patched" if patched else "unpatched", str(N_CALLS), str(BARE_HOLD_S)],
                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )  # fmt: skip
        client = await MessageBus(bus_address=bus.address).connect()
        try:
            name = read_line(proc, 20)
            assert name.startswith(":"), stderr_path.read_text()

            async def get(n: int) -> str:
                try:
                    reply = await asyncio.wait_for(client.call(Message(
                        destination=name, path="/big", interface="org.example.Big",
                        member="Get", signature="u", body=[n])), 15)  # fmt: skip
                except (TimeoutError, OSError) as e:
                    return repr(e)
                if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
                    return f"error {reply.error_name if reply else None}"
                return "ok" if reply.body == [expected_big(n)] else "corrupt"

            bus_pid = await bus_daemon_pid(client)
            calls = asyncio.ensure_future(asyncio.gather(*(get(n) for n in range(N_CALLS))))
            await asyncio.sleep(BARE_HOLD_S / 2)  # the calls are in; the replies are held
            with stalled(bus_pid):
                await asyncio.sleep(BARE_HOLD_S + 1.0)  # the replies are written now
            outcomes = await calls
            try:
                code = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
            after = ""
            if code is None:  # still running: does it still answer?
                after = await get(N_CALLS)
            return {"outcomes": outcomes, "exit": code, "after": after,
                    "stdout": proc.stdout.read() if code is not None and proc.stdout else "",
                    "stderr": stderr_path.read_text()[-2000:]}  # fmt: skip
        finally:
            client.disconnect()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


async def test_unpatched_dbus_fast_service_dies_under_the_load(tmp_path: Path) -> None:
    """Documents the library fault: if this starts passing dbus-fast has been fixed upstream."""
    result = await run_bare_service(patched=False, tmp_path=tmp_path)
    assert result["exit"] == 3, result  # its connection dropped
    assert "DISCONNECTED" in result["stdout"], result
    assert result["outcomes"].count("ok") < N_CALLS, result["outcomes"]


async def test_patched_dbus_fast_service_survives_the_same_load(tmp_path: Path) -> None:
    began = time.monotonic()
    result = await run_bare_service(patched=True, tmp_path=tmp_path)
    assert result["exit"] is None, result
    assert result["outcomes"] == ["ok"] * N_CALLS, result["outcomes"]
    assert result["after"] == "ok", result
    assert time.monotonic() - began < 20
