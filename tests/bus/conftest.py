"""Fixtures for tests through the public interface: a private system-type bus, neurond as a
subprocess on it (libvirt's test driver), and a dbus-fast client.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.harness import REPO_ROOT, Daemon, PrivateBus, run_as_nobody

NAME = "org.neuronos.Neuron1"
ROOT = "/org/neuronos/Neuron1"
MANAGER_PATH = f"{ROOT}/Manager"
MANAGER = "org.neuronos.Neuron1.Manager"
VM = "org.neuronos.Neuron1.VM"
JOB = "org.neuronos.Neuron1.Job"
ERR = "org.neuronos.Neuron1.Error."
DBUS_ERR = "org.freedesktop.DBus.Error."
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
HOOKS = ["--test-hooks"]  # enables NEUROND_FAULTS
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's domain "test"
TEST_PATH = f"{ROOT}/vm/{TEST_UUID.replace('-', '_')}"

# Every VM method that needs a polkit action, with arguments as gdbus takes them (valid ones:
# a refusal must come from authorization, not from the arguments).
VM_METHOD_ARGS: dict[str, tuple[str, ...]] = {
    "Start": ("{}",),
    "Shutdown": ("{}",),
    "ForceOff": (),
    "Reboot": (),
    "Reset": (),
    "Pause": (),
    "Resume": (),
    "Delete": ("{}",),
    "SetAutostart": ("true",),
    "GetDisplay": (),
    "GuestPing": (),
    "GuestInfo": (),
    "GuestExec": ("'/bin/true'", "@as []", "{}"),
    "Rename": ("'renamed-by-nobody'",),
    "SetMemory": ("512", "{}"),
    "SetVCPUs": ("1", "{}"),
    "ChangeMedia": ("'/var/lib/neurond/images/x.iso'",),
    "EjectMedia": (),
}


def gdbus_error(stderr: str) -> str:
    """The D-Bus error name in gdbus's stderr (``GDBus.Error:<name>: <message>``); "" if none."""
    marker = "GDBus.Error:"
    if marker not in stderr:
        return ""
    return stderr.split(marker, 1)[1].split(":", 1)[0].strip()


class CallFailed(Exception):
    """An error reply: ``name`` is the D-Bus error name, ``text`` its message."""

    def __init__(self, name: str, body: list[Any], signature: str) -> None:
        self.name = name
        self.body = body
        self.signature = signature
        self.text = body[0] if body and isinstance(body[0], str) else ""
        super().__init__(f"{name}: {self.text}")


class Client:
    """A dbus-fast client connection with a terse ``call`` and a signal recorder."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []
        bus.add_message_handler(self._record)

    def _record(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.signals.append(msg)
        return False

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        flags: int = 0,
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
                flags=flags,
            )
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise CallFailed(reply.error_name or "", reply.body, reply.signature)
        return list(reply.body)

    async def get(self, path: str, interface: str, prop: str) -> Any:
        (value,) = await self.call(
            path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, prop]
        )
        return value.value

    async def subscribe(self) -> None:
        """Receive every signal neurond sends (a match rule; BecomeMonitor is denied)."""
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',sender='{NAME}'"],
            )
        )

    def changes(self, path: str) -> list[dict[str, Any]]:
        """The PropertiesChanged bodies seen for ``path``, values unwrapped."""
        return [
            {k: v.value for k, v in m.body[1].items()}
            for m in self.signals
            if m.member == "PropertiesChanged" and m.path == path
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)


async def flood(address: str, calls: int) -> list[str]:
    """``calls`` concurrent ListJobs from one fresh connection: "ok" or the error name of each
    (for the per-sender limit; give ListJobs a delay fault so they are in flight together)."""
    c = Client(await MessageBus(bus_address=address).connect())
    try:

        async def one() -> str:
            try:
                await c.call(MANAGER_PATH, MANAGER, "ListJobs")
            except CallFailed as e:
                return e.name
            return "ok"

        return list(await asyncio.gather(*(one() for _ in range(calls))))
    finally:
        c.bus.disconnect()


# A bus on which root may own polkit's name (FakePolkit): PrivateBus(extra_config=…).
FAKE_POLKIT_POLICY = """
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>"""


class FakePolkit:
    """polkit's authority, faked (mocked: what these tests need of polkitd, a grant it retains
    or an answer at a chosen moment, takes an authentication agent and a typed password).
    ``decide(action id)`` gives (authorized, retained); every check is recorded as (action id,
    details)."""

    def __init__(self, decide: Callable[[str], tuple[bool, bool]]) -> None:
        self.decide = decide
        self.checks: list[tuple[str, dict[str, str]]] = []
        self.bus: MessageBus | None = None

    async def start(self, address: str) -> FakePolkit:
        self.bus = await MessageBus(bus_address=address).connect()
        await self.bus.request_name("org.freedesktop.PolicyKit1")
        self.bus.add_message_handler(self._check)
        return self

    def _check(self, msg: Message) -> bool:
        if msg.member != "CheckAuthorization" or msg.message_type is not MessageType.METHOD_CALL:
            return False
        action, details = msg.body[1], dict(msg.body[2])
        self.checks.append((action, details))
        authorized, retained = self.decide(action)
        result = {"polkit.retains_authorization_after_challenge": "1"} if retained else {}
        assert self.bus is not None
        self.bus.send(Message.new_method_return(msg, "(bba{ss})", [[authorized, False, result]]))
        return True

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()


# One connection as nobody for many calls (gdbus makes one per call): the system python with
# the venv's dbus-fast (the venv's own python lives under /root, 0700). Each stdin line is a
# JSON [path, interface, member, signature, body]; each answer line "ok" or the error name.
_NOBODY_CLIENT = """
import asyncio, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        path, iface, member, sig, body = json.loads(line)
        reply = await bus.call(Message(destination=sys.argv[2], path=path, interface=iface,
                                       member=member, signature=sig, body=body))
        ok = reply.message_type is MessageType.METHOD_RETURN
        print("ok" if ok else reply.error_name, flush=True)

asyncio.run(main())
"""


class NobodyClient:
    """A lasting connection of uid 65534 to neurond (a polkit grant is kept per connection)."""

    async def start(self, address: str) -> NobodyClient:
        site = REPO_ROOT / ".venv/lib/python3.11/site-packages"
        cmd = ["env", f"PYTHONPATH={site}", "/usr/bin/python3", "-c", _NOBODY_CLIENT, address, NAME]
        self.proc = await asyncio.create_subprocess_exec(
            *run_as_nobody(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        return self

    async def call(
        self, path: str, interface: str, member: str, signature: str = "", body: Any = ()
    ) -> str:
        """The reply: "ok", or its error name."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        line = json.dumps([path, interface, member, signature, list(body)])
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode().strip()

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 10)


def opts(**kw: Variant) -> dict[str, Variant]:
    return dict(kw)


@pytest.fixture
def private_bus() -> Iterator[PrivateBus]:
    with PrivateBus() as bus:
        yield bus


@pytest.fixture
def start_daemon(private_bus: PrivateBus) -> Iterator[Callable[..., Daemon]]:
    """Start neurond on the private bus; every one started is stopped at teardown."""
    started: list[Daemon] = []

    def start(**kwargs: Any) -> Daemon:
        d = Daemon(private_bus, **kwargs)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.close()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
async def client(private_bus: PrivateBus) -> AsyncIterator[Client]:
    bus = await MessageBus(bus_address=private_bus.address).connect()
    c = Client(bus)
    await c.subscribe()
    yield c
    bus.disconnect()
