"""Fault injection for tests: named points that fail on demand.

Only active when the daemon runs with ``--test-hooks``; then ``NEUROND_FAULTS`` holds
``point:effect[:arg][,…]``. Effects: ``error`` (an unexpected exception), ``libvirt`` (a libvirt
error, raised by the virt layer at its points), ``delay:SECONDS`` (the point waits),
``block:SECONDS`` (the point blocks its thread: at a ``bus.*`` point that is the event loop, which
stops everything, watchdog pings included, as a hung handler would), ``tasks`` (a probe, not a
fault: the point logs how many asyncio tasks exist, so a soak test can see tasks return to their
baseline). Without the flag nothing here is ever consulted, so a shipped daemon cannot be made to
fail this way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from neurond.errors import InvalidConfigError

EFFECTS = ("error", "libvirt", "delay", "block", "tasks")
_log = logging.getLogger("neurond.faults")


@dataclass(frozen=True)
class Fault:
    point: str
    effect: str
    seconds: float = 0.0


class InjectedFault(RuntimeError):
    """The unexpected exception an ``error`` fault raises."""


_faults: dict[str, Fault] = {}


def configure(spec: str) -> None:
    """Parse NEUROND_FAULTS; a malformed entry is InvalidConfigError (tests must not guess)."""
    _faults.clear()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = item.partition(":")
        effect, _, arg = rest.partition(":")
        if not point or effect not in EFFECTS:
            raise InvalidConfigError(
                f"Bad NEUROND_FAULTS entry {item!r}: want point:{'|'.join(EFFECTS)}."
            )
        try:
            seconds = float(arg) if effect in ("delay", "block") else 0.0
        except ValueError:
            raise InvalidConfigError(f"Bad delay in NEUROND_FAULTS entry {item!r}.") from None
        _faults[point] = Fault(point, effect, seconds)


def active() -> dict[str, Fault]:
    return dict(_faults)


def hit(point: str) -> Fault | None:
    """Apply a blocking fault at ``point`` (for executor threads); return it for ``libvirt``."""
    fault = _faults.get(point)
    if fault is None:
        return None
    if fault.effect in ("delay", "block"):
        time.sleep(fault.seconds)
        return None
    if fault.effect == "error":
        raise InjectedFault(f"injected fault at {point}")
    if fault.effect == "tasks":
        return None  # a probe of the event loop: nothing to count in a thread
    return fault


async def ahit(point: str) -> Fault | None:
    """The event-loop form of ``hit``: a delay awaits instead of blocking (``block`` blocks)."""
    fault = _faults.get(point)
    if fault is not None and fault.effect == "delay":
        await asyncio.sleep(fault.seconds)
        return None
    if fault is not None and fault.effect == "tasks":
        count = len(asyncio.all_tasks())
        _log.warning(
            "Probe %s: %d asyncio tasks",
            point,
            count,
            extra={"fields": {"NEUROND_TASKS": str(count)}},
        )
        return None
    return hit(point)
