"""One VM as neurond sees it: libvirt's last known truth plus the transition neurond runs on it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from neurond.core.backend import DomainInfo
from neurond.core.jobs import Job
from neurond.core.states import TRANSIENT, Method, VMState


@dataclass(eq=False)
class Operation:
    """A transition in flight; an identical call joins it by awaiting ``result``."""

    method: Method
    result: asyncio.Future[Any]
    job: Job | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set when the slot is freed
    forced: asyncio.Future[None] | None = None  # a ForceOff taking over this Shutdown


@dataclass(eq=False)
class VM:
    """The state machine of one VM. ``info`` is libvirt's truth; ``state`` is what we show."""

    info: DomainInfo
    state: VMState = field(init=False)
    reason: str = field(init=False)
    op: Operation | None = None
    removed: bool = False
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state, self.reason = self.info.state, self.info.reason

    @property
    def uuid(self) -> str:
        return self.info.uuid

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def owner(self) -> int:
        return self.info.owner

    def properties(self) -> dict[str, Any]:
        """Every property by its core name (the bus layer names and types them)."""
        i = self.info
        return {
            "name": i.name,
            "uuid": i.uuid,
            "state": self.state.value,
            "reason": self.reason,
            "persistent": i.persistent,
            "autostart": i.autostart,
            "vcpus": i.vcpus,
            "memory_mib": i.memory_mib,
            "gpu_address": i.gpu_address,
            "looking_glass": i.looking_glass,
            "guest_agent": i.guest_agent,
            "owner": i.owner,
            "media": i.media,
        }

    def _visible(self) -> tuple[VMState, str]:
        if self.op is not None and self.op.method in TRANSIENT:
            return TRANSIENT[self.op.method]
        return self.info.state, self.info.reason

    def update(self, info: DomainInfo | None = None) -> dict[str, Any]:
        """Take new libvirt truth (or just re-derive the visible state); return what changed."""
        before = self.properties()
        if info is not None:
            self.info = info
        self.state, self.reason = self._visible()
        after = self.properties()
        changed = {k: v for k, v in after.items() if before[k] != v}
        if "state" in changed or "reason" in changed:
            # API.md: a state change is one PropertiesChanged carrying State and StateReason.
            changed["state"], changed["reason"] = after["state"], after["reason"]
        self._wake()
        return changed

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait_until(self, states: frozenset[VMState]) -> None:
        """Return once libvirt reports one of ``states``; raises if the VM goes away meanwhile."""
        while self.info.state not in states:
            if self.removed:
                raise LookupError(self.uuid)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
