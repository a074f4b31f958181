"""Per-sender limits: a flooding caller gets LimitExceeded, the others are still served."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dbus_fast.aio import MessageBus

from tests.bus.conftest import ERR, HOOKS, MANAGER, MANAGER_PATH, CallFailed, Client
from tests.harness import Daemon, PrivateBus


async def _outcome(client: Client) -> str:
    try:
        await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    except CallFailed as e:
        return e.name
    return "ok"


async def test_calls_in_flight_per_sender(
    private_bus: PrivateBus, start_daemon: Callable[..., Daemon], client: Client
) -> None:
    start_daemon(
        config={"limits": {"calls_per_sender": 2}},
        extra_args=HOOKS,
        env={"NEUROND_FAULTS": "bus.ListVMs:delay:0.5"},
    )
    other = Client(await MessageBus(bus_address=private_bus.address).connect())
    try:
        flood = [asyncio.ensure_future(_outcome(client)) for _ in range(6)]
        await asyncio.sleep(0.1)
        # Another caller is not starved by the flood.
        assert await _outcome(other) == "ok"
        results = await asyncio.gather(*flood)
    finally:
        other.bus.disconnect()
    assert results.count("ok") == 2
    assert results.count(ERR + "LimitExceeded") == 4
    # The limit counts calls in flight, not calls ever made.
    assert await _outcome(client) == "ok"
