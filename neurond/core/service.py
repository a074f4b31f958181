"""The VM registry and the lifecycle operations: the core of neurond, with no libvirt or dbus.

Libvirt events are the truth for states: every event makes the VM look again (refreshes of one
VM are serialised, so their results apply in order). A transition holds the VM's one operation
slot; an identical call joins it, any other call meanwhile is InvalidState.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from neurond import log, messages
from neurond.core.backend import Backend, DomainInfo, DomainState
from neurond.core.guest import Display, ExecRequest, ExecResult, GuestInfo, agent_unavailable
from neurond.core.jobs import Job, JobManager
from neurond.core.states import ALLOWED, MEDIA_LIVE, Method, VMState
from neurond.core.vm import VM, Operation
from neurond.domain.spec import PROFILES
from neurond.errors import (
    InvalidArgumentError,
    InvalidStateError,
    LibvirtConnectionFailedError,
    NeuronError,
    TimeoutError_,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from neurond.validate import is_uuid

_log = logging.getLogger("neurond.core")
MIN_MEMORY_MIB = 128  # SetMemory's floor (issue 12)


class VMListener(Protocol):
    def vm_added(self, vm: VM) -> None: ...
    def vm_changed(self, vm: VM, changed: dict[str, Any]) -> None: ...
    def vm_removed(self, vm: VM) -> None: ...
    def connection_changed(self, connected: bool) -> None: ...


# The states whose arrival is a catalogued event (systemd/neurond.catalog).
_STATE_MESSAGES = {
    VMState.RUNNING: messages.VM_STARTED,
    VMState.SHUTOFF: messages.VM_STOPPED,
    VMState.CRASHED: messages.VM_CRASHED,
}


def _state_fields(vm: VM) -> dict[str, str]:
    fields = {"NEUROND_VM": vm.name, "NEUROND_STATE": vm.state, "NEUROND_REASON": vm.reason}
    if vm.state in _STATE_MESSAGES:
        fields["MESSAGE_ID"] = _STATE_MESSAGES[vm.state]
    return fields


class VMService:
    """Owns every VM object and runs the methods of API.md's state table on them."""

    def __init__(self, backend: Backend, listener: VMListener, jobs: JobManager) -> None:
        self.backend = backend
        self.listener = listener
        self.jobs = jobs
        self.vms: dict[str, VM] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._full: set[str] = set()  # dirty VMs whose next read is not for events only
        self._reads = 0  # refresh reads started (of any VM): _end's check for a fresher read
        self._reading: set[str] = set()  # VMs whose refresh read is in flight
        # VMs whose transition's action (and its read) runs: their refreshes read after it.
        self._acting: dict[str, asyncio.Future[None]] = {}

    # ---- lookup -------------------------------------------------------------------------

    def sorted_vms(self) -> list[VM]:
        return sorted(self.vms.values(), key=lambda v: (v.name, v.uuid))

    def find(self, name_or_uuid: str) -> VM:
        vm = self.vms.get(name_or_uuid.lower())
        if vm is None:
            vm = next((v for v in self.vms.values() if v.name == name_or_uuid), None)
        if vm is None:
            what = "with UUID" if is_uuid(name_or_uuid) else "named"
            raise VMNotFoundError(
                f"There is no VM {what} {name_or_uuid!r}.", details={"vm": name_or_uuid}
            )
        return vm

    # ---- following libvirt --------------------------------------------------------------

    async def sync(self) -> None:
        """Make the registry equal libvirt's domain list (start-up and after a reconnect)."""
        domains = await self.backend.list_domains()
        seen = set()
        for info in domains:
            seen.add(info.uuid)
            self._apply(info.uuid, info)
        for uuid in [u for u in self.vms if u not in seen]:
            self._apply(uuid, None)

    def domain_event(self, uuid: str) -> None:
        uuid = uuid.lower()
        if uuid in self._acting and uuid not in self._refreshing:
            # The action's own event, typically: read once the transition ended (_transition),
            # after its signal, not beside its read.
            self._dirty.add(uuid)
            return
        self._schedule_refresh(uuid)

    def connection_changed(self, connected: bool) -> None:
        self.listener.connection_changed(connected)

    def _schedule_refresh(self, uuid: str, full: bool = False) -> asyncio.Task[None]:
        self._dirty.add(uuid)
        if full:
            self._full.add(uuid)
        task = self._refreshing.get(uuid)
        if task is None:
            task = asyncio.ensure_future(self._refresh_loop(uuid))
            self._refreshing[uuid] = task
        return task

    async def refresh(self, uuid: str) -> None:
        """Look at the domain again, after everything already scheduled for it."""
        with contextlib.suppress(NeuronError):
            await asyncio.shield(self._schedule_refresh(uuid, full=True))

    async def _refresh_loop(self, uuid: str) -> None:
        try:
            while uuid in self._dirty:
                acting = self._acting.get(uuid)
                if acting is not None:
                    # The action's own event, typically: read after the action's read, not
                    # beside it (that read would make _end read once more).
                    await asyncio.wait({acting})
                    continue
                self._dirty.discard(uuid)
                # After events only, the backend may read just the state (a pause, a resume).
                full = uuid in self._full or uuid not in self.vms
                self._full.discard(uuid)
                self._reads += 1
                self._reading.add(uuid)
                try:
                    info = await self.backend.get_domain(uuid, full)
                except NeuronError as e:
                    log.log_error(_log, e, f"Could not read domain {uuid}: {e.message}")
                    return
                finally:
                    self._reading.discard(uuid)
                if isinstance(info, DomainState):
                    vm = self.vms.get(uuid)
                    if vm is None:  # forgotten meanwhile (a resync): read all of it
                        self._schedule_refresh(uuid, full=True)
                        continue
                    info = dataclasses.replace(vm.info, state=info.state, reason=info.reason)
                self._apply(uuid, info)
        finally:
            del self._refreshing[uuid]

    def _apply(self, uuid: str, info: DomainInfo | None) -> None:
        vm = self.vms.get(uuid)
        if info is None:
            # A VM being created has no domain yet (or it is rolled back): its create owns it.
            if vm is not None and not (vm.op is not None and vm.op.method is Method.CREATE):
                del self.vms[uuid]
                vm.removed = True
                vm.update()
                _log.info(
                    "VM %s is gone",
                    vm.name,
                    extra={"fields": {"NEUROND_VM": vm.name, "MESSAGE_ID": messages.VM_DELETED}},
                )
                self.listener.vm_removed(vm)
            return
        if vm is None:
            vm = VM(info)
            self.vms[uuid] = vm
            _log.info(
                "VM %s appeared (%s)",
                vm.name,
                vm.state,
                extra={"fields": {"NEUROND_VM": vm.name, "MESSAGE_ID": messages.VM_CREATED}},
            )
            self.listener.vm_added(vm)
            return
        self._changed(vm, vm.update(info))

    def _changed(self, vm: VM, changed: dict[str, Any]) -> None:
        """Tell the listener what changed and log a state change (a catalogued event); the
        signal first: the log line costs about 70 µs before it otherwise (issue 11)."""
        if not changed:
            return
        self.listener.vm_changed(vm, changed)
        if "state" in changed:
            _log.info(
                "VM %s is %s (%s)",
                vm.name,
                vm.state,
                vm.reason,
                extra={"fields": _state_fields(vm)},
            )

    def _set_op(self, vm: VM, op: Operation | None) -> None:
        if vm.op is not None and vm.op is not op:
            vm.op.ended.set()
        vm.op = op
        self._changed(vm, vm.update())

    # ---- transitions --------------------------------------------------------------------

    def _check(self, vm: VM, method: Method) -> None:
        if not self.backend.connected:
            raise LibvirtConnectionFailedError(
                f"neurond has lost its connection to libvirt ({self.backend.uri}); "
                "try again shortly.",
                details={"uri": self.backend.uri},
            )
        if vm.removed:
            raise VMNotFoundError(f"VM {vm.name!r} no longer exists.", details={"vm": vm.name})
        if vm.op is not None and vm.op.method is not method:
            raise InvalidStateError(
                f"VM {vm.name!r} is busy: a {vm.op.method} is in progress (state {vm.state}).",
                details={"vm": vm.name, "state": vm.state, "busy": vm.op.method},
            )
        if vm.op is None and vm.state not in ALLOWED[method]:
            raise InvalidStateError(
                f"Cannot {method} VM {vm.name!r} while it is {vm.state}.",
                details={"vm": vm.name, "state": vm.state, "operation": method},
            )

    async def _transition(
        self,
        vm: VM,
        method: Method,
        action: Callable[[], Awaitable[DomainInfo | DomainState | None]],
    ) -> None:
        """Run ``action`` as the VM's one transition; an identical call in flight is joined.

        ``action`` may return the domain as read right after it, in the same executor job:
        the slot is then freed without a second trip to libvirt (see _end).
        """
        self._check(vm, method)
        if vm.op is not None:
            await asyncio.shield(vm.op.result)
            return
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._set_op(vm, Operation(method, result))
        reads, fresh = self._reads, None
        acting = self._acting[vm.uuid] = asyncio.get_running_loop().create_future()
        try:
            fresh = await action()
        except BaseException as e:
            result.set_exception(e)
            result.exception()  # retrieved here: joiners re-raise it, nobody else must
            raise
        else:
            result.set_result(None)
        finally:
            del self._acting[vm.uuid]
            acting.set_result(None)
            try:
                await self._end(vm, fresh, reads)
            finally:
                if vm.uuid in self._dirty:  # events held back while the action ran
                    self._schedule_refresh(vm.uuid)

    async def _end(
        self, vm: VM, fresh: DomainInfo | DomainState | None = None, reads: int = -1
    ) -> None:
        """Free the VM's slot after reading libvirt's state, so the state moves only once.

        ``fresh`` (read after the action, in its executor job) is applied as it is when no
        refresh read began since ``reads`` and none of this VM is in flight: nothing applied
        before is newer, and every later read (the action's own event's, say) starts after
        it. Otherwise the VM is read again, after the refreshes in flight. A DomainState (a
        pause's or resume's read) replaces only the state of what is known.
        """
        try:
            if fresh is not None and reads == self._reads and vm.uuid not in self._reading:
                if isinstance(fresh, DomainState):
                    fresh = dataclasses.replace(vm.info, state=fresh.state, reason=fresh.reason)
                self._apply(vm.uuid, fresh)
            else:
                await self.refresh(vm.uuid)
        finally:
            self._set_op(vm, None)

    async def start(self, vm: VM, paused: bool) -> None:
        await self._transition(vm, Method.START, lambda: self.backend.start(vm.uuid, paused))

    async def pause(self, vm: VM) -> None:
        await self._transition(vm, Method.PAUSE, lambda: self.backend.suspend(vm.uuid))

    async def resume(self, vm: VM) -> None:
        await self._transition(vm, Method.RESUME, lambda: self.backend.resume(vm.uuid))

    async def reboot(self, vm: VM) -> None:
        await self._transition(vm, Method.REBOOT, lambda: self.backend.reboot(vm.uuid))

    async def reset(self, vm: VM) -> None:
        await self._transition(vm, Method.RESET, lambda: self.backend.reset(vm.uuid))

    async def set_autostart(self, vm: VM, enabled: bool) -> None:
        self._check(vm, Method.SET_AUTOSTART)
        await self.backend.set_autostart(vm.uuid, enabled)
        await self.refresh(vm.uuid)

    # ---- changes after creation (issue 12) ------------------------------------------------

    def _check_alone(self, vm: VM, method: Method) -> None:
        """As _check, and no call of the same method may be joined: each carries its own value."""
        self._check(vm, method)
        if vm.op is not None:
            raise InvalidStateError(
                f"VM {vm.name!r} is busy: a {vm.op.method} is in progress (state {vm.state}).",
                details={"vm": vm.name, "state": vm.state, "busy": vm.op.method},
            )

    async def rename(self, vm: VM, new_name: str) -> None:
        self._check_alone(vm, Method.RENAME)
        if new_name == vm.name:
            return
        other = next((v for v in self.vms.values() if v.name == new_name), None)
        if other is not None:
            raise VMAlreadyExistsError(
                f"Cannot rename VM {vm.name!r}: a VM named {new_name!r} already exists.",
                details={"vm": vm.name, "name": new_name},
            )
        await self._transition(vm, Method.RENAME, lambda: self.backend.rename(vm.uuid, new_name))

    async def set_memory(self, vm: VM, mib: int, live: bool) -> None:
        self._check_alone(vm, Method.SET_RESOURCES)
        host_mib, _ = await self.backend.host_limits()
        minimum, why = MIN_MEMORY_MIB, ""
        profile = PROFILES.get(vm.info.profile)  # neurond's metadata; none if made elsewhere
        if profile is not None and profile.min_memory_mib > minimum:
            minimum, why = profile.min_memory_mib, f" (the {profile.name} profile's minimum)"
        if not minimum <= mib <= host_mib:
            raise InvalidArgumentError(
                f"Memory of {mib} MiB is out of bounds: at least {minimum} MiB{why} and at "
                f"most the host's {host_mib} MiB.",
                details={"argument": "mib", "minimum": minimum, "maximum": host_mib},
            )
        live = live and vm.state in (VMState.RUNNING, VMState.PAUSED)
        await self._transition(
            vm, Method.SET_RESOURCES, lambda: self.backend.set_memory(vm.uuid, mib, live)
        )

    async def set_vcpus(self, vm: VM, count: int, live: bool) -> None:
        self._check_alone(vm, Method.SET_RESOURCES)
        _, host_cpus = await self.backend.host_limits()
        if not 1 <= count <= host_cpus:
            raise InvalidArgumentError(
                f"{count} vCPUs is out of bounds: at least 1 and at most the host's "
                f"{host_cpus} CPUs.",
                details={"argument": "count", "minimum": 1, "maximum": host_cpus},
            )
        live = live and vm.state in (VMState.RUNNING, VMState.PAUSED)
        await self._transition(
            vm, Method.SET_RESOURCES, lambda: self.backend.set_vcpus(vm.uuid, count, live)
        )

    async def change_media(self, vm: VM, path: str | None) -> None:
        """Insert ``path`` (a checked ISO) into the VM's CD-ROM, or eject it (None): live and
        persistent on a running or paused VM, persistent on a shut-off one."""
        self._check_alone(vm, Method.MEDIA)
        live = vm.state in MEDIA_LIVE
        await self._transition(vm, Method.MEDIA, lambda: self.backend.change_media(vm.uuid, path))
        _log.info(
            "VM %s: %s (%s)",
            vm.name,
            f"inserted {path} in the CD-ROM" if path is not None else "ejected the CD-ROM",
            "live and persistent" if live else "persistent",
            extra={
                "fields": {
                    "NEUROND_VM": vm.name,
                    "NEUROND_MEDIA": path or "",
                    "NEUROND_LIVE": str(live).lower(),
                }
            },
        )

    # ---- guest agent and display (no transition: they leave the state alone) ------------

    def _check_agent(self, vm: VM) -> None:
        self._check(vm, Method.GUEST)
        if vm.info.guest_agent != "connected":  # API.md: fail without waiting
            raise agent_unavailable(vm.name, vm.info.guest_agent)

    async def guest_ping(self, vm: VM, agent_timeout_s: float) -> None:
        self._check_agent(vm)
        await self.backend.guest_ping(vm.uuid, agent_timeout_s)

    async def guest_info(self, vm: VM, agent_timeout_s: float) -> GuestInfo:
        self._check_agent(vm)
        return await self.backend.guest_info(vm.uuid, agent_timeout_s)

    async def guest_exec(self, vm: VM, request: ExecRequest, agent_timeout_s: float) -> ExecResult:
        self._check_agent(vm)
        return await self.backend.guest_exec(vm.uuid, request, agent_timeout_s)

    async def display(self, vm: VM) -> Display:
        self._check(vm, Method.DISPLAY)
        return await self.backend.display(vm.uuid)

    async def force_off(self, vm: VM) -> None:
        # ForceOff takes over a Shutdown job (which ends cancelled) and waits out other
        # transitions (a Start, a Pause) before it destroys.
        while (op := vm.op) is not None and op.method is not Method.FORCE_OFF:
            if vm.state not in ALLOWED[Method.FORCE_OFF]:
                break  # _check names the state
            if op.job is not None:
                await self._take_over(vm, op)
                return
            if not op.result.done():
                await asyncio.wait([op.result])
                continue
            await op.ended.wait()
        await self._transition(vm, Method.FORCE_OFF, lambda: self.backend.destroy(vm.uuid))

    async def _take_over(self, vm: VM, op: Operation) -> None:
        """Destroy while the Shutdown still holds the slot, so the VM goes from stopping
        straight to shutoff; the Shutdown job sees ``forced`` and ends cancelled."""
        if op.forced is None:
            self._check(vm, Method.SHUTDOWN)  # the connection is up, the VM still exists
            op.forced = asyncio.get_running_loop().create_future()
            try:
                if vm.info.state is not VMState.SHUTOFF:
                    await self.backend.destroy(vm.uuid)
            except BaseException as e:
                op.forced.set_exception(e)
                op.forced.exception()
                op.forced = None
                raise
            op.forced.set_result(None)
        else:
            await asyncio.shield(op.forced)
        await op.ended.wait()

    async def shutdown(self, vm: VM, uid: int, timeout_s: int, force: bool) -> Job:
        """Ask the guest to power off (ACPI); the returned job ends when the VM is off."""
        self._check(vm, Method.SHUTDOWN)
        if vm.op is not None:
            job: Job = await asyncio.shield(vm.op.result)
            return job
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        op = Operation(Method.SHUTDOWN, result)
        vm.op = op  # holds the slot; the visible state moves to stopping once ACPI is asked
        try:
            await self.backend.shutdown(vm.uuid)
        except BaseException as e:
            result.set_exception(e)
            result.exception()
            self._set_op(vm, None)
            raise
        self._set_op(vm, op)

        async def work(job: Job) -> None:
            try:
                await self._await_off(vm, timeout_s, force)
                if op.forced is not None:
                    raise asyncio.CancelledError  # ForceOff took over: the job is cancelled
            finally:
                await self._end(vm)

        op.job = self.jobs.start("shutdown-vm", uid, [vm.uuid], work)
        result.set_result(op.job)
        return op.job

    async def _await_off(self, vm: VM, timeout_s: int, force: bool) -> None:
        off = frozenset({VMState.SHUTOFF})
        try:
            await asyncio.wait_for(vm.wait_until(off), timeout_s)
            return
        except LookupError:
            raise VMNotFoundError(
                f"VM {vm.name!r} disappeared while shutting down.", details={"vm": vm.name}
            ) from None
        except TimeoutError:
            if not force:
                raise TimeoutError_(
                    f"VM {vm.name!r} did not shut down within {timeout_s} s and keeps running; "
                    "shut it down from inside or use ForceOff.",
                    details={"vm": vm.name, "timeout_s": timeout_s},
                ) from None
        _log.info(
            "VM %s did not shut down within %s s: destroying it",
            vm.name,
            timeout_s,
            extra={"fields": {"NEUROND_VM": vm.name}},
        )
        await self.backend.destroy(vm.uuid)
