"""Watchdog (issue 9, item 6): pings stop while the event loop is blocked, and come back after.

A `block:SECONDS` fault at `bus.ListErrors` (neurond/faults.py, --test-hooks only) blocks
neurond's event loop in that call, as a hung handler would. With WATCHDOG_USEC = 0.4 s neurond
pings every 0.2 s (tests/bus/test_daemon.py checks the rate): here the gap between two pings
spans the whole block, and pings resume once it ends. Only gross gaps are asserted (the block
is 1.5 s, normal gaps 0.2 s), so a loaded machine does not make it flaky.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from tests.bus.conftest import HOOKS, MANAGER, MANAGER_PATH, Client
from tests.harness import Daemon

BLOCK_S = 1.5


async def test_pings_stop_while_the_loop_is_blocked(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(
        extra_args=HOOKS,
        env={"WATCHDOG_USEC": "400000", "NEUROND_FAULTS": f"bus.ListErrors:block:{BLOCK_S}"},
    )
    arrivals: list[float] = []  # when each WATCHDOG=1 was seen (10 ms resolution)

    async def sample() -> None:
        seen = 0
        while True:
            n = d.notifications.count("WATCHDOG=1")
            arrivals.extend([time.monotonic()] * (n - seen))
            seen = n
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    try:
        await asyncio.sleep(1.0)
        before = len(arrivals)
        sent = time.monotonic()
        (errors,) = await client.call(MANAGER_PATH, MANAGER, "ListErrors")  # blocks the loop
        answered = time.monotonic()
        assert errors, "the blocked call still gets its reply"
        await asyncio.sleep(1.0)
    finally:
        sampler.cancel()
    assert answered - sent >= BLOCK_S - 0.1
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert before >= 3 and max(gaps[: before - 1]) < 1.0, f"pings before the block: {gaps}"
    # One gap covers the block: no ping while the loop was stuck.
    assert max(gaps) >= BLOCK_S - 0.2, f"pings went on while the loop was blocked: {gaps}"
    # The loop was surely blocked from answered - BLOCK_S to sent + BLOCK_S (the block began
    # between sending and answered - BLOCK_S); allow 0.15 s for a ping sent just before it.
    during = [t for t in arrivals if answered - BLOCK_S + 0.15 < t < sent + BLOCK_S]
    assert during == [], f"{len(during)} pings during the block"
    after = [t for t in arrivals if t > answered]
    assert len(after) >= 3, f"pings did not resume: {len(after)} in 1 s after the block"
