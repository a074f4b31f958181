"""What the core asks of the hypervisor (implemented by neurond.virt), and what it hears back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from neurond.core.guest import Display, ExecRequest, ExecResult, GuestInfo
from neurond.core.states import VMState
from neurond.domain.parse import DomainSummary


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """A snapshot of one libvirt domain, as the core keeps it."""

    uuid: str
    name: str
    state: VMState
    reason: str
    persistent: bool
    autostart: bool
    vcpus: int
    memory_mib: int
    gpu_address: str = ""
    looking_glass: bool = False
    guest_agent: str = "none"  # connected | disconnected | none
    owner: int = 0  # the uid that created it through neurond; 0 when defined elsewhere
    profile: str = ""  # the NeuronOS profile it was created with; "" when defined elsewhere
    media: str = ""  # the file in the first CD-ROM drive, "" when empty or without one

    @classmethod
    def of(
        cls, summary: DomainSummary, state: VMState, reason: str, persistent: bool, autostart: bool
    ) -> DomainInfo:
        """The snapshot from a domain's parsed XML and what libvirt says beside it."""
        return cls(
            uuid=summary.uuid,
            name=summary.name,
            state=state,
            reason=reason,
            persistent=persistent,
            autostart=autostart,
            vcpus=summary.vcpus,
            memory_mib=summary.memory_mib,
            gpu_address=summary.gpu_address,
            looking_glass=summary.looking_glass,
            guest_agent=summary.guest_agent,
            owner=summary.owner,
            profile=summary.profile,
            media=summary.media,
        )


@dataclass(frozen=True, slots=True)
class DomainState:
    """Only a domain's state, read when nothing else about it changed (get_domain)."""

    state: VMState
    reason: str


class EventSink(Protocol):
    """The core's side of the backend's events; called on the event loop."""

    def domain_event(self, uuid: str) -> None:
        """Something about the domain may have changed (defined, started, …): look again."""

    def connection_changed(self, connected: bool) -> None:
        """The hypervisor connection went down or came (back) up."""


class Backend(Protocol):
    """The hypervisor as the core sees it. Every method raises NeuronError subclasses only."""

    @property
    def uri(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    async def list_domains(self) -> list[DomainInfo]: ...

    async def get_domain(self, uuid: str, full: bool = True) -> DomainInfo | DomainState | None:
        """The domain now, or None when it no longer exists. With ``full`` False (a refresh
        for events) only its state when every event since its last read changed nothing
        else: a pause or resume (the core keeps the rest of what it knew)."""

    # The transitions' actions return the domain as read right after the action, in the same
    # worker job (None when that read failed or the domain is gone): VMService._end. A pause
    # or resume changes nothing but the state, so only the state is read after it.
    async def start(self, uuid: str, paused: bool) -> DomainInfo | None: ...

    async def shutdown(self, uuid: str) -> None: ...

    async def destroy(self, uuid: str) -> DomainInfo | None: ...

    async def suspend(self, uuid: str) -> DomainState | None: ...

    async def resume(self, uuid: str) -> DomainState | None: ...

    async def reboot(self, uuid: str) -> DomainInfo | None: ...

    async def reset(self, uuid: str) -> DomainInfo | None: ...

    async def set_autostart(self, uuid: str, enabled: bool) -> None: ...

    async def rename(self, uuid: str, new_name: str) -> DomainInfo | None: ...

    async def host_limits(self) -> tuple[int, int]:
        """(host memory in MiB, host CPUs)."""

    async def set_memory(self, uuid: str, mib: int, live: bool) -> DomainInfo | None:
        """Always the persistent definition; also the running VM when ``live``."""

    async def set_vcpus(self, uuid: str, count: int, live: bool) -> DomainInfo | None:
        """Always the persistent definition; also the running VM when ``live``."""

    async def change_media(self, uuid: str, path: str | None) -> DomainInfo | None:
        """Insert ``path`` into the first CD-ROM (None: eject): on an active VM live and
        persistent, on an inactive one persistent; NotSupportedError without a CD-ROM."""

    async def domain_files(self) -> dict[str, frozenset[str]]:
        """Per domain UUID, the host files its live and persistent definitions refer to."""

    async def guest_ping(self, uuid: str, timeout_s: float) -> None:
        """Each guest agent command waits at most ``timeout_s``."""

    async def guest_info(self, uuid: str, timeout_s: float) -> GuestInfo: ...

    async def guest_exec(self, uuid: str, request: ExecRequest, timeout_s: float) -> ExecResult: ...

    async def display(self, uuid: str) -> Display:
        """The best usable display, from the live domain XML and the host."""
