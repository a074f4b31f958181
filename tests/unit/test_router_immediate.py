"""Router's ``immediate`` methods (neurond/bus/router.py) run to their end as the call arrives:
the reply is sent before ``_on_message`` returns; a handler declared immediate that waits
after all is a programming error, answered with Internal (never a hang or a lost reply).
Everything else is tested through the bus (tests/bus/test_manager.py and the others call
GetVM, ListVMs, ListJobs, ListErrors and GetManagedObjects on this path).
"""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.introspection import Arg, Interface, Method

from neurond.bus.router import Call, Exported, Router
from neurond.bus.spec import ROOT


class _Bus:
    """Records what the router sends (the router needs only these two methods)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def add_message_handler(self, handler: Any) -> None:
        pass

    def send(self, msg: Message) -> None:
        self.sent.append(msg)


def _router() -> tuple[Router, _Bus]:
    spec = Interface("org.example.Reads")
    spec.methods = [
        Method("Now", in_args=[Arg("s", name="x")], out_args=[Arg("s", name="y")]),
        Method("Waits", out_args=[Arg("s", name="y")]),
    ]

    async def now(call: Call, x: str) -> str:
        return x.upper()

    async def waits(call: Call) -> str:
        await asyncio.sleep(0)
        return "never"

    bus = _Bus()
    router = Router(bus, 5.0, 10)  # type: ignore[arg-type]
    router.add(f"{ROOT}/r", [Exported(spec, dict, {"Now": now, "Waits": waits},
                                      immediate=frozenset({"Now", "Waits"}))])  # fmt: skip
    router._uids[":1.7"] = 1000  # the caller's uid is known (else the call takes a task)
    return router, bus


def _call(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    msg = Message(destination="org.example", path=f"{ROOT}/r", interface="org.example.Reads",
                  member=member, signature=signature, body=body or [], serial=3)  # fmt: skip
    msg.sender = ":1.7"
    return msg


def test_an_immediate_method_is_answered_before_on_message_returns() -> None:
    router, bus = _router()
    assert router._on_message(_call("Now", "s", ["abc"])) is True
    (reply,) = bus.sent
    assert reply.message_type is MessageType.METHOD_RETURN and reply.body == ["ABC"]
    assert not router.tasks


def test_bad_arguments_are_a_typed_error_here_too() -> None:
    router, bus = _router()
    router._on_message(_call("Now", "i", [1]))
    (reply,) = bus.sent
    assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"


def test_an_immediate_handler_that_waits_is_internal() -> None:
    router, bus = _router()
    router._on_message(_call("Waits"))
    (reply,) = bus.sent
    assert reply.error_name == "org.neuronos.Neuron1.Error.Internal"
    assert not router.tasks
