"""The floor of bench/compare.py: a trivial dbus-fast service on the same bus.

    python bench/helpers/echo_service.py   # owns org.neuronos.BenchEcho, prints "ready"

One object, /org/neuronos/BenchEcho, interface org.neuronos.BenchEcho: `Echo(s) -> s`,
`Lookup(s) -> o` (returns its own path, the shape of GetVM) and a read-only property
`State` (s). Nothing else: the cost of a call here is the cost of dbus-daemon plus dbus-fast.
"""

# ruff: noqa: UP037  (dbus-fast reads D-Bus signatures from string annotations)
from __future__ import annotations

import asyncio

from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

NAME = "org.neuronos.BenchEcho"
PATH = "/org/neuronos/BenchEcho"


class Echo(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(NAME)

    @method()
    def Echo(self, text: "s") -> "s":  # type: ignore[name-defined]  # noqa: F821
        return text

    @method()
    def Lookup(self, name: "s") -> "o":  # type: ignore[name-defined]  # noqa: F821
        return PATH

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        return "running"


async def main() -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    bus.export(PATH, Echo())
    await bus.request_name(NAME)
    print("ready", flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    asyncio.run(main())
