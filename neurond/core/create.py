"""Creating and deleting VMs as jobs: each is a transaction with a record on disk.

Before its first step a create writes a record of everything it will make (volume, NVRAM,
Looking Glass shm file, domain) to ``storage.state_dir``; it marks steps as they finish and
removes the record at the end. A failure or cancel rolls back everything the record names,
and so does the next start of neurond for records a killed daemon left behind. Every name in
a record holds the VM's fresh UUID, so rolling back can only ever touch what the create made.

A delete writes its record (``delete-<uuid>.json``: the domain and exactly the volumes and
files it will remove) before it stops the VM. A delete a killed daemon left behind is rolled
*forward* at the next start: the user asked for it and the domain may already be destroyed or
undefined, so going back is not possible; the start removes what the record names, nothing
else, and counts what is already gone as removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, get_type_hints

from neurond import faults, log, messages
from neurond.core.backend import DomainInfo
from neurond.core.jobs import Job
from neurond.core.service import VMService
from neurond.core.states import Method, VMState
from neurond.core.vm import VM, Operation
from neurond.domain.build import HostFacts, VMFiles, to_xml
from neurond.domain.parse import summarize
from neurond.domain.spec import KEY_TYPES, Settings, looking_glass_mib, parse_spec, resolve
from neurond.errors import (
    InvalidStateError,
    LibvirtConnectionFailedError,
    NeuronError,
    OperationFailedError,
    VMAlreadyExistsError,
    VMCreationFailedError,
    VMNotFoundError,
)

_log = logging.getLogger("neurond.create")
RECORD_RE = re.compile(
    r"(create|delete)-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.json"
)
RECORD_VERSION = 1  # of both record kinds; a record of another version is logged and left
STEPS = ("volume", "nvram", "shm", "define", "autostart")


@dataclass
class Plan:
    """What one create makes (the record's content); empty fields are not made."""

    uuid: str
    name: str
    pool_dir: str = ""
    volume: str = ""  # volume name in the pool of pool_dir
    capacity_gib: int = 0
    nvram: str = ""
    nvram_template: str = ""
    shm: str = ""
    shm_mib: int = 0
    xml: str = ""
    autostart: bool = False
    done: list[str] = field(default_factory=list)
    kind: str = "create"
    version: int = RECORD_VERSION


@dataclass
class DeletePlan:
    """What one Delete removes (the delete record's content): the domain, then exactly these
    storage volumes and files (NVRAM, Looking Glass shm), as absolute paths."""

    uuid: str
    name: str
    volumes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    kind: str = "delete"
    version: int = RECORD_VERSION


Record = Plan | DeletePlan

SPEC_KEYS = KEY_TYPES  # CreateVM's spec keys and the Python type each is read as
__all__ = [
    "SPEC_KEYS",
    "Creator",
    "DeletePlan",
    "Plan",
    "Provisioner",
    "RecordStore",
    "Settings",
    "settings_from",
]


def settings_from(values: dict[str, Any]) -> Settings:
    """CreateVM's spec (already read by type) checked and resolved over its profile."""
    return resolve(parse_spec(values))


class Provisioner(Protocol):
    """The host side of creating and deleting VMs (implemented by neurond.virt.create).

    Removal methods treat a missing object as removed. Every method raises NeuronError only.
    """

    async def host_facts(self, settings: Settings) -> HostFacts:
        """What the host gives the VM; MissingDependencyError when it lacks firmware or swtpm."""

    def plan(self, uuid: str, settings: Settings, host: HostFacts) -> Plan:
        """Name the VM's files (every name holds the UUID)."""

    async def create_volume(self, pool_dir: str, name: str, capacity_gib: int) -> str: ...
    async def delete_volume(self, pool_dir: str, name: str) -> None: ...
    async def copy_file(self, template: str, path: str) -> None: ...
    async def create_shm(self, path: str, size_mib: int) -> None: ...
    async def remove_file(self, path: str) -> None: ...
    async def define(self, xml: str) -> None: ...
    async def undefine(self, uuid: str) -> None: ...
    async def set_autostart(self, uuid: str, enabled: bool) -> None: ...

    async def delete_plan(self, uuid: str, name: str, delete_storage: bool) -> DeletePlan:
        """What deleting the domain removes: its own storage volumes when asked (not those
        another domain uses, nor disks that are no libvirt volume), NVRAM, shm file."""

    async def delete_volume_at(self, path: str, owner: str) -> bool:
        """Delete the storage volume at ``path`` (gone already counts as deleted); False when
        it is kept because a domain other than ``owner`` uses it or libvirt no longer knows
        it as a volume."""


class RecordStore:
    """The transaction records in ``storage.state_dir``: one JSON file per create or delete
    in flight (``create-<uuid>.json``, ``delete-<uuid>.json``), each with its format version.
    ``file_dirs``: where the files a delete removes may be (the image and shm directories)."""

    def __init__(self, directory: Path, file_dirs: tuple[Path, ...] = ()) -> None:
        self.directory = directory
        self.file_dirs = file_dirs

    def _path(self, uuid: str, kind: str = "create") -> Path:
        return self.directory / f"{kind}-{uuid}.json"

    def write(self, plan: Record) -> None:
        path = self._path(plan.uuid, plan.kind)
        tmp = path.with_suffix(".tmp")
        data = json.dumps(asdict(plan), indent=1).encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only state_dir: typed, and no half-written file
            with contextlib.suppress(OSError):
                tmp.unlink()
            error = VMCreationFailedError if plan.kind == "create" else OperationFailedError
            raise error(
                f"Could not write the {plan.kind} record {path}: {e.strerror}.",
                details={"path": str(path)},
            ) from None
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, uuid: str, kind: str = "create") -> None:
        path = self._path(uuid, kind)
        # A read-only state_dir fails unlink with EROFS even when nothing is there.
        try:
            if path.exists():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        except OSError as e:
            raise OperationFailedError(
                f"Could not remove the {kind} record {path}: {e.strerror}.",
                details={"path": str(path)},
            ) from None

    def leftovers(self) -> list[Record]:
        """The records in the directory; other files there are never touched, and one that
        cannot be read (or names another VM, or foreign objects) is logged and left."""
        plans: list[Record] = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                _log.error("Cannot list the state directory %s: %s", self.directory, e.strerror)
            return []
        for name in names:
            m = RECORD_RE.fullmatch(name)
            if not m:
                continue
            kind, uuid = m.groups()
            try:
                plan = _from_json(kind, json.loads((self.directory / name).read_text()))
                if plan.uuid != uuid:
                    raise ValueError("it names another VM")
                if not _names_ok(plan, self.file_dirs):
                    raise ValueError("it names objects that are not this VM's")
            except (OSError, ValueError, TypeError, NeuronError) as e:
                _log.error(
                    "Cannot use the %s record %s: %s; leaving it",
                    kind,
                    name,
                    e,
                    extra={"fields": {"NEUROND_PATH": str(self.directory / name)}},
                )
                continue
            plans.append(plan)
        return plans


def _from_json(kind: str, data: object) -> Record:
    """A record read back, every field of the type it is written with (ValueError if not)."""
    cls: type[Plan] | type[DeletePlan] = Plan if kind == "create" else DeletePlan
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    version = data.get("version", RECORD_VERSION)  # records before the field were version 1
    if version != RECORD_VERSION:
        raise ValueError(f"format version {version!r}; this neurond reads {RECORD_VERSION}")
    if data.get("kind", kind) != kind:
        raise ValueError(f"kind {data.get('kind')!r} in a {kind} record")
    plan = cls(**data)
    hints = get_type_hints(cls)
    for f in fields(cls):
        value, hint = getattr(plan, f.name), hints[f.name]
        ok = (
            isinstance(value, list) and all(type(v) is str for v in value)
            if hint == list[str]
            else type(value) is hint
        )
        if not ok:
            raise ValueError(f"field {f.name!r} is not {getattr(hint, '__name__', hint)}")
    return plan


def _names_ok(plan: Record, file_dirs: tuple[Path, ...]) -> bool:
    """The guard of recovery: a create record names only objects carrying its UUID (so a
    rollback can only touch what the create made); a delete record only absolute paths, its
    files directly in one of ``file_dirs`` (as a delete plans them: never anything else)."""
    if isinstance(plan, DeletePlan):
        dirs = {os.path.realpath(d) for d in file_dirs}
        return all(
            os.path.isabs(p) and os.path.normpath(p) == p for p in plan.volumes + plan.files
        ) and all(os.path.realpath(os.path.dirname(p)) in dirs for p in plan.files)
    return _names_uuid(plan)


def _names_uuid(plan: Plan) -> bool:
    """Every object a record names carries its UUID (the guard of rolling back)."""
    return all(plan.uuid in Path(p).name for p in (plan.volume, plan.nvram, plan.shm) if p) and (
        not plan.xml or summarize(plan.xml).uuid == plan.uuid
    )


class Creator:
    """CreateVM and Delete on top of the VM registry, as jobs."""

    def __init__(
        self,
        service: VMService,
        provisioner: Provisioner,
        records: RecordStore,
        shutdown_timeout_s: Callable[[], int],
    ) -> None:
        self.service = service
        self.prov = provisioner
        self.records = records
        self.shutdown_timeout_s = shutdown_timeout_s
        self._active: set[str] = set()  # UUIDs of creates in flight (their records are live)
        # The domain XML of each create in flight, by UUID: its files are in use before libvirt
        # has the domain (DeleteImage must not take them away).
        self.creating: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._recovered = False

    # ---- create -------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if any(v.name == name for v in self.service.vms.values()):
            raise VMAlreadyExistsError(f"A VM named {name!r} already exists.", details={"vm": name})

    async def create(
        self, settings: Settings, hostdevs: tuple[str, ...], uid: int
    ) -> tuple[VM, Job]:
        svc = self.service
        if not svc.backend.connected:
            raise LibvirtConnectionFailedError(
                f"neurond has lost its connection to libvirt ({svc.backend.uri}); "
                "try again shortly.",
                details={"uri": svc.backend.uri},
            )
        self._check_name(settings.name)
        await _fault("create.host")
        host = await self.prov.host_facts(settings)
        uuid = str(uuidlib.uuid4())
        plan = self.prov.plan(uuid, settings, host)
        if settings.looking_glass:
            plan.shm_mib = looking_glass_mib(*settings.resolution)
        files = VMFiles(
            uuid=uuid,
            disk=str(Path(plan.pool_dir) / plan.volume) if plan.volume else "",
            nvram=plan.nvram,
            hostdevs=hostdevs,
        )
        plan.xml = to_xml(settings, host, files, owner=uid)
        plan.autostart = settings.autostart
        info = DomainInfo.of(
            summarize(plan.xml), VMState.CREATING, "create", True, settings.autostart
        )
        self._check_name(settings.name)  # again: another create may have taken it meanwhile
        vm = VM(info)
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        op = Operation(Method.CREATE, result)
        vm.op = op
        vm.update()
        svc.vms[uuid] = vm
        self._active.add(uuid)
        self.creating[uuid] = plan.xml
        with log.bind(vm=settings.name):
            _log.info(
                "Creating VM %s (%s, profile %s)",
                settings.name,
                uuid,
                settings.profile.name,
                extra={"fields": {"NEUROND_VM": settings.name, "NEUROND_UUID": uuid}},
            )
        svc.listener.vm_added(vm)

        async def work(job: Job) -> None:
            await self._run_create(vm, plan, job)

        job = svc.jobs.start("create-vm", uid, [uuid], work)
        op.job = job
        result.set_result(job)
        self._spawn(self._after_create(vm, job))
        return vm, job

    async def _run_create(self, vm: VM, plan: Plan, job: Job) -> None:
        actions: dict[str, Callable[[], Awaitable[object]]] = {
            "volume": lambda: self.prov.create_volume(
                plan.pool_dir, plan.volume, plan.capacity_gib
            ),
            "nvram": lambda: self.prov.copy_file(plan.nvram_template, plan.nvram),
            "shm": lambda: self.prov.create_shm(plan.shm, plan.shm_mib),
            "define": lambda: self.prov.define(plan.xml),
            "autostart": lambda: self.prov.set_autostart(plan.uuid, True),
        }
        wanted = {
            "volume": bool(plan.volume),
            "nvram": bool(plan.nvram),
            "shm": bool(plan.shm),
            "define": True,
            "autostart": plan.autostart,
        }
        steps = [s for s in STEPS if wanted[s]]
        try:
            await self._step("create.record", lambda: asyncio.to_thread(self.records.write, plan))
            for i, step in enumerate(steps):
                await self._step(f"create.{step}", actions[step])
                plan.done.append(step)
                await asyncio.to_thread(self.records.write, plan)
                job.report((i + 1) / (len(steps) + 1), force=True)
            await self._step("create.finish", lambda: self.service.refresh(plan.uuid))
        except BaseException:
            # Roll back even when cancelled; a second cancel leaves the record for the next start.
            await asyncio.shield(self._rollback(plan))
            raise
        await asyncio.to_thread(self.records.remove, plan.uuid)

    async def _step(self, point: str, action: Callable[[], Awaitable[object]]) -> None:
        """Run one step to its end, even when the job is cancelled meanwhile: what it makes
        must exist (or not) before the rollback looks."""
        await _fault(point)
        task = asyncio.ensure_future(action())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait([task])
            raise

    async def _rollback(self, plan: Plan) -> bool:
        """Remove what ``plan`` names, newest first; True when all of it is gone."""
        if not _names_uuid(plan):
            _log.error("The create record of %s names foreign objects; leaving it", plan.uuid)
            return False
        undo: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("domain", lambda: self.prov.undefine(plan.uuid)),
            ("shm", lambda: self.prov.remove_file(plan.shm) if plan.shm else _nothing()),
            ("nvram", lambda: self.prov.remove_file(plan.nvram) if plan.nvram else _nothing()),
            (
                "volume",
                lambda: (
                    self.prov.delete_volume(plan.pool_dir, plan.volume)
                    if plan.volume
                    else _nothing()
                ),
            ),
        ]
        ok = True
        for what, action in undo:
            try:
                await action()
            except NeuronError as e:
                ok = False
                log.log_error(
                    _log, e, f"Rolling back the create of {plan.name}: {what}: {e.message}"
                )
        if ok:
            await asyncio.to_thread(self.records.remove, plan.uuid)
            _log.info(
                "Rolled back the create of %s (%s)",
                plan.name,
                plan.uuid,
                extra={"fields": {"NEUROND_VM": plan.name, "NEUROND_UUID": plan.uuid}},
            )
        return ok

    async def _after_create(self, vm: VM, job: Job) -> None:
        """Free the VM's slot once the job has ended; a failed create's VM then goes."""
        await job.done.wait()
        self._active.discard(vm.uuid)
        self.creating.pop(vm.uuid, None)
        svc = self.service
        op = vm.op
        if job.error is None:
            await svc._end(vm)
        else:
            if svc.vms.get(vm.uuid) is vm:
                del svc.vms[vm.uuid]
            vm.removed = True
            vm.op = None
            svc.listener.vm_removed(vm)
            # libvirt may still tell of the domain the rollback removed: look again
            await svc.refresh(vm.uuid)
        if op is not None:
            op.ended.set()

    async def recover(self) -> None:
        """Complete what a previous neurond left half done: roll back its creates, roll its
        deletes forward. Called at each connect to libvirt until every record is dealt with
        (a record that cannot be read is logged and left, and does not count)."""
        if self._recovered:
            return
        all_done = True
        for plan in await asyncio.to_thread(self.records.leftovers):
            if plan.uuid in self._active:
                continue
            ids = {"NEUROND_VM": plan.name, "NEUROND_UUID": plan.uuid}
            with log.bind(vm=plan.name):
                _log.warning(
                    "Found the unfinished %s of %s (%s) from a previous run: %s",
                    plan.kind,
                    plan.name,
                    plan.uuid,
                    "rolling it back" if plan.kind == "create" else "finishing it",
                    extra={"fields": {**ids, "NEUROND_OPERATION": plan.kind}},
                )
                try:
                    if isinstance(plan, DeletePlan):
                        done = not await self._finish_delete(plan)
                    else:
                        done = await self._rollback(plan)
                except NeuronError as e:
                    done = False
                    log.log_error(_log, e, f"Could not complete the {plan.kind}: {e.message}")
                except Exception:  # noqa: BLE001 — one record must never stop the start
                    done = False
                    _log.error("Could not complete the %s", plan.kind, exc_info=True)
                if done:
                    _log.warning(
                        "Completed the interrupted %s of %s (%s): removed %s",
                        plan.kind,
                        plan.name,
                        plan.uuid,
                        ", ".join(_named(plan)),
                        extra={
                            "fields": {
                                **ids,
                                "MESSAGE_ID": messages.RECOVERED,
                                "NEUROND_OPERATION": plan.kind,
                                "NEUROND_REMOVED": "\n".join(_named(plan)),
                            }
                        },
                    )
                else:
                    _log.error(
                        "The %s of %s (%s) is still not complete; its record stays for the "
                        "next start",
                        plan.kind,
                        plan.name,
                        plan.uuid,
                        extra={"fields": {**ids, "NEUROND_OPERATION": plan.kind}},
                    )
            all_done = all_done and done
            await self.service.refresh(plan.uuid)
        self._recovered = all_done

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- delete -------------------------------------------------------------------------

    async def delete(self, vm: VM, uid: int, delete_storage: bool, force: bool) -> Job:
        """Delete's job; an identical Delete in flight is joined (same job)."""
        svc = self.service
        method = Method.DELETE_FORCE if force else Method.DELETE
        svc._check(vm, method)
        if vm.op is not None:
            joined: Job = await asyncio.shield(vm.op.result)
            return joined
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        op = Operation(method, result)
        svc._set_op(vm, op)  # deleting at once

        async def work(job: Job) -> None:
            self._active.add(vm.uuid)  # its record is live: not for recover()
            try:
                await self._run_delete(vm, job, delete_storage)
            finally:
                self._active.discard(vm.uuid)
                await svc._end(vm)

        op.job = svc.jobs.start("delete-vm", uid, [vm.uuid], work)
        result.set_result(op.job)
        return op.job

    async def _run_delete(self, vm: VM, job: Job, delete_storage: bool) -> None:
        """Record what goes, stop the VM, then remove it: up to the stop a failure or cancel
        leaves the VM and drops the record; after it the delete finishes (even when
        cancelled), and what could not be removed keeps the record for the next start."""
        plan = await self.prov.delete_plan(vm.uuid, vm.name, delete_storage)
        try:
            await self._step("delete.record", lambda: asyncio.to_thread(self.records.write, plan))
            await _fault("delete.stop")
            await self._stop_for_delete(vm, job)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.records.remove, plan.uuid, "delete"))
            raise
        job.report(0.5, force=True)

        async def finish() -> list[str]:
            try:
                await self._remove_domain(plan)
            except BaseException:  # the domain stays: so does the VM, without a record
                await asyncio.to_thread(self.records.remove, plan.uuid, "delete")
                raise
            return await self._remove_storage(plan)

        task = asyncio.ensure_future(finish())
        try:
            left = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait([task])
            raise
        if left:
            raise OperationFailedError(
                f"VM {vm.name!r} is deleted but {', '.join(left)} could not be removed; "
                "neurond tries again at its next start.",
                details={"vm": vm.name, "paths": ", ".join(left)},
            )

    async def _finish_delete(self, plan: DeletePlan) -> list[str]:
        """Roll a delete forward: what of ``plan`` is left (nothing: the record is gone too)."""
        await self._remove_domain(plan)
        return await self._remove_storage(plan)

    async def _remove_domain(self, plan: DeletePlan) -> None:
        """Undefine the domain (destroying it if it runs; gone already is fine)."""
        await _fault("delete.domain")
        await self.prov.undefine(plan.uuid)

    async def _remove_storage(self, plan: DeletePlan) -> list[str]:
        """Remove exactly the volumes and files ``plan`` names, each as far as it goes (gone
        already counts as removed); what is left. Nothing left: the record goes."""
        left = []
        await _fault("delete.volumes")
        for path in plan.volumes:
            try:
                await self.prov.delete_volume_at(path, plan.uuid)
            except NeuronError as e:
                left.append(path)
                log.log_error(_log, e, f"Deleting {plan.name}: {e.message}")
        await _fault("delete.files")
        for path in plan.files:
            try:
                await self.prov.remove_file(path)
            except NeuronError as e:
                left.append(path)
                log.log_error(_log, e, f"Deleting {plan.name}: {e.message}")
        if not left:
            await asyncio.to_thread(self.records.remove, plan.uuid, "delete")
        return left

    async def _stop_for_delete(self, vm: VM, job: Job) -> None:
        svc = self.service
        await svc.refresh(vm.uuid)
        state = vm.info.state
        if state is VMState.SHUTOFF:
            return
        if state is VMState.RUNNING:
            timeout = self.shutdown_timeout_s()
            with contextlib.suppress(InvalidStateError):
                await svc.backend.shutdown(vm.uuid)
            try:
                await asyncio.wait_for(vm.wait_until(frozenset({VMState.SHUTOFF})), timeout)
                return
            except LookupError:
                raise VMNotFoundError(
                    f"VM {vm.name!r} disappeared while it was being deleted.",
                    details={"vm": vm.name},
                ) from None
            except TimeoutError:
                _log.info(
                    "VM %s did not shut down within %s s: destroying it before deleting it",
                    vm.name,
                    timeout,
                    extra={"fields": {"NEUROND_VM": vm.name}},
                )
        with contextlib.suppress(InvalidStateError):  # not running (any more)
            await svc.backend.destroy(vm.uuid)
        await svc.refresh(vm.uuid)


async def _nothing() -> None:
    return None


async def _fault(point: str) -> None:
    """The fault hook at a create or delete step (only with --test-hooks)."""
    if await faults.ahit(point) is not None:
        if point.startswith("create."):
            raise VMCreationFailedError(f"Could not create the VM: injected fault at {point}.")
        raise OperationFailedError(f"Could not delete the VM: injected fault at {point}.")


def _named(plan: Record) -> list[str]:
    """What a record names, for the log: the domain, then volumes and files."""
    if isinstance(plan, DeletePlan):
        return [f"domain {plan.uuid}", *plan.volumes, *plan.files]
    volume = str(Path(plan.pool_dir) / plan.volume) if plan.volume else ""
    return [f"domain {plan.uuid}", *(p for p in (plan.shm, plan.nvram, volume) if p)]
