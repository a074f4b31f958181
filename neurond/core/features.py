"""The registry of optional features behind ``Manager.Features``: names with availability checks.

A check runs on ``refresh`` only (at every libvirt (re)connect), never on a property read, and
its answer is cached. A check that raises counts as unavailable, and the failure is logged with
its code: a broken check must be visible, not look like a missing feature.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from neurond import log
from neurond.errors import NeuronError

_log = logging.getLogger("neurond.features")

Check = Callable[[], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    check: Check


class FeatureRegistry:
    """Named availability checks and their last answers, in registration order."""

    def __init__(self, features: Iterable[Feature] = ()) -> None:
        self._features: list[Feature] = []
        self._available: list[str] = []
        for feature in features:
            self.register(feature)

    def register(self, feature: Feature) -> None:
        if any(f.name == feature.name for f in self._features):
            raise ValueError(f"feature {feature.name!r} is registered twice")
        self._features.append(feature)

    def available(self) -> list[str]:
        """The features found available by the last refresh."""
        return list(self._available)

    async def refresh(self) -> bool:
        """Run every check again; True when the set of available features changed."""
        found = []
        for feature in self._features:
            if await self._run(feature):
                found.append(feature.name)
        changed = found != self._available
        self._available = found
        if changed:
            _log.info("Optional features available: %s", ", ".join(found) or "none")
        return changed

    async def _run(self, feature: Feature) -> bool:
        try:
            return bool(await feature.check())
        except NeuronError as e:
            log.log_error(_log, e, f"The check of feature {feature.name!r} failed: {e.message}")
        except Exception:  # noqa: BLE001 - logged with its traceback, the feature is off
            _log.error("The check of feature %r raised", feature.name, exc_info=True)
        return False
