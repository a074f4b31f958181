"""The neurond interfaces on the bus: thin handlers (parse → authorize → core → reply) and the
signals that follow the core's VMs and jobs.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dbus_fast import Variant

from neurond import __version__, validate
from neurond.bus import create as bus_create
from neurond.bus.auth import Authorizer
from neurond.bus.router import Call, Exported, Router
from neurond.bus.spec import (
    API_VERSION,
    HARDWARE,
    HARDWARE_IFACE,
    JOB,
    JOB_IFACE,
    MANAGER,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    ROOT,
    VM,
    VM_IFACE,
)
from neurond.config import Config
from neurond.core.create import Creator
from neurond.core.features import FeatureRegistry
from neurond.core.guest import MAX_EXEC_STDIN, ExecRequest
from neurond.core.images import Images, check_name, files_lock
from neurond.core.jobs import Job, JobManager
from neurond.core.service import VMService
from neurond.core.states import MEDIA_LIVE, VMState
from neurond.core.vm import VM as CoreVM
from neurond.downloads import DownloadManager
from neurond.errors import (
    InvalidArgumentError,
    InvalidStateError,
    LimitExceededError,
    error_table,
)
from neurond.hardware import GPU, HardwareReader, Readiness

# The polkit action of every method that is not a read (API.md, Authorization).
ACTIONS: dict[tuple[str, str], str] = {
    (VM, "Start"): "vm-lifecycle",
    (VM, "Shutdown"): "vm-lifecycle",
    (VM, "ForceOff"): "vm-lifecycle",
    (VM, "Reboot"): "vm-lifecycle",
    (VM, "Reset"): "vm-lifecycle",
    (VM, "Pause"): "vm-lifecycle",
    (VM, "Resume"): "vm-lifecycle",
    (VM, "SetAutostart"): "vm-manage",
    (VM, "Rename"): "vm-manage",
    (VM, "SetMemory"): "vm-manage",
    (VM, "SetVCPUs"): "vm-manage",
    # On a running or paused VM these are vm-lifecycle instead (issue 12): see media_action.
    (VM, "ChangeMedia"): "vm-manage",
    (VM, "EjectMedia"): "vm-manage",
    # Not reads: image names are not broadcast in signals (API.md's reason for reads), and
    # issue 12 puts images under vm-manage.
    (MANAGER, "ListImages"): "vm-manage",
    (MANAGER, "DeleteImage"): "vm-manage",
    (MANAGER, "DownloadImage"): "vm-manage",
    (MANAGER, "CreateVM"): "vm-manage",
    (VM, "Delete"): "vm-manage",
    (VM, "GetDisplay"): "vm-console",
    (VM, "GuestPing"): "guest",
    (VM, "GuestInfo"): "guest",
    (VM, "GuestExec"): "guest-exec",
    (JOB, "Cancel"): "cancel-job-other-user",  # only when the caller did not start the job
}
READS: frozenset[tuple[str, str]] = frozenset(
    {
        (MANAGER, "ListVMs"),
        (MANAGER, "GetVM"),
        (MANAGER, "ListJobs"),
        (MANAGER, "ListErrors"),
        (HARDWARE, "GetIOMMUStatus"),
        (HARDWARE, "ListGPUs"),
        (HARDWARE, "CheckPassthrough"),
        ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
    }
)


def media_action(member: str, state: VMState) -> str:
    """ChangeMedia/EjectMedia's action: vm-lifecycle when it changes a running (or paused) VM,
    else ACTIONS' vm-manage (issue 12)."""
    return "vm-lifecycle" if state in MEDIA_LIVE else ACTIONS[(VM, member)]


# Seconds of call_s kept free after a GuestExec's run for killing it and replying.
EXEC_REPLY_MARGIN_S = 2.0

VM_PROPS = {
    "name": "Name",
    "uuid": "UUID",
    "state": "State",
    "reason": "StateReason",
    "persistent": "Persistent",
    "autostart": "Autostart",
    "vcpus": "VCPUs",
    "memory_mib": "MemoryMiB",
    "gpu_address": "GPUAddress",
    "looking_glass": "LookingGlass",
    "guest_agent": "GuestAgent",
    "owner": "Owner",
    "media": "Media",
}


def vm_path(uuid: str) -> str:
    return f"{ROOT}/vm/{uuid.replace('-', '_')}"


def job_path(job: Job) -> str:
    return f"{ROOT}/job/{job.number}"


def unwrap(options: dict[str, Variant]) -> dict[str, tuple[str, Any]]:
    return {k: (v.signature, v.value) for k, v in options.items()}


def readiness_dict(r: Readiness) -> dict[str, Variant]:
    return {
        "ready": Variant("b", r.ready),
        "reasons": Variant("as", list(r.reasons)),
        "warnings": Variant("as", list(r.warnings)),
    }


def gpu_dict(g: GPU) -> dict[str, Variant]:
    return {
        "address": Variant("s", g.address),
        "vendor_id": Variant("s", g.vendor_id),
        "device_id": Variant("s", g.device_id),
        "vendor": Variant("s", g.vendor),
        "name": Variant("s", g.name),
        "class": Variant("s", g.class_code),
        "driver": Variant("s", g.driver),
        "iommu_group": Variant("i", g.iommu_group),
        "boot_vga": Variant("b", g.boot_vga),
        "group_devices": Variant("as", list(g.group_devices)),
        "passthrough_ready": Variant("b", g.readiness.ready),
        "reasons": Variant("as", list(g.readiness.reasons)),
        "warnings": Variant("as", list(g.readiness.warnings)),
    }


def _readable_iso(iso: str, roots: tuple[Path, ...]) -> str:
    """The real path of a readable regular file under an ISO root; InvalidArgument if not."""
    path = validate.file_under_roots(iso, roots, "iso")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NOCTTY))
    except OSError as e:
        raise InvalidArgumentError(
            f"iso {path!r} cannot be read: {e.strerror}.", details={"argument": "iso"}
        ) from None
    return path


class BusService:
    """Implements the core's VM and job listeners by exporting objects and emitting signals."""

    def __init__(
        self, router: Router, auth: Authorizer, config: Config, hardware: HardwareReader
    ) -> None:
        self.router = router
        self.auth = auth
        self.config = config
        self.hardware = hardware
        self.core: VMService | None = None
        self.jobs: JobManager | None = None
        self._connected = False
        self.features: FeatureRegistry | None = None  # set by the daemon
        self.downloads: DownloadManager | None = None  # set by the daemon
        self.creator: Creator | None = None  # set by the daemon (CreateVM, Delete)

    def attach(self, core: VMService, jobs: JobManager) -> None:
        self.core, self.jobs = core, jobs
        self.router.add(
            ROOT,
            [
                Exported(
                    OBJECT_MANAGER_IFACE,
                    dict,
                    {"GetManagedObjects": self._get_managed_objects},
                    immediate=frozenset({"GetManagedObjects"}),
                )
            ],
        )
        self.router.add(
            MANAGER_PATH,
            [
                Exported(
                    MANAGER_IFACE,
                    self._manager_props,
                    {
                        "ListVMs": self._list_vms,
                        "GetVM": self._get_vm,
                        "ListJobs": self._list_jobs,
                        "ListErrors": self._list_errors,
                        "DownloadImage": self._download_image,
                        "ListImages": self._list_images,
                        "DeleteImage": self._delete_image,
                        "CreateVM": functools.partial(bus_create.create_vm, self),
                    },
                    # Reads of neurond's memory that never wait (Router: no task for them).
                    immediate=frozenset({"ListVMs", "GetVM", "ListJobs", "ListErrors"}),
                ),
                Exported(
                    HARDWARE_IFACE,
                    dict,
                    {
                        "GetIOMMUStatus": self._get_iommu_status,
                        "ListGPUs": self._list_gpus,
                        "CheckPassthrough": self._check_passthrough,
                    },
                ),
            ],
        )

    def _core(self) -> VMService:
        assert self.core is not None, "attach() first"
        return self.core

    # ---- Manager ------------------------------------------------------------------------

    def _manager_props(self) -> dict[str, Any]:
        return {
            "APIVersion": API_VERSION,
            "Version": __version__,
            "LibvirtURI": self._core().backend.uri,
            "Connected": self._connected,
            "Features": self._features(),
        }

    def _features(self) -> list[str]:
        # Read on every read of the property: a GPU can be rebound or hot-plugged at any time.
        # The registry's features are cached and change on refresh (features_changed).
        cached = self.features.available() if self.features is not None else []
        return cached + (["gpu-passthrough"] if self.hardware.any_ready() else [])

    def features_changed(self) -> None:
        self.router.properties_changed(MANAGER_PATH, MANAGER, {"Features": self._features()})

    async def _get_managed_objects(self, call: Call) -> Any:
        return self.router.managed_objects(call.msg)

    async def _list_vms(self, call: Call) -> list[list[str]]:
        return [[v.name, v.uuid, vm_path(v.uuid), v.state.value] for v in self._core().sorted_vms()]

    async def _get_vm(self, call: Call, name_or_uuid: str) -> str:
        return vm_path(self._core().find(validate.name_or_uuid(name_or_uuid)).uuid)

    async def _list_jobs(self, call: Call) -> list[str]:
        assert self.jobs is not None
        return [job_path(j) for j in self.jobs.jobs.values()]

    async def _list_errors(self, call: Call) -> list[list[Any]]:
        return [list(row) for row in error_table()]

    async def _download_image(self, call: Call, url: str, options: dict[str, Variant]) -> str:
        assert self.downloads is not None, "the daemon sets downloads"
        opts = validate.Options(unwrap(options), "DownloadImage")
        sha256 = opts.str("sha256", max_length=64)
        filename = opts.str("filename", max_length=1024)
        size = opts.uint("size", 0, minimum=1) if "size" in options else None
        opts.done()
        if not sha256:
            raise InvalidArgumentError(
                "Option 'sha256' of DownloadImage is required: the SHA-256 of the file.",
                details={"option": "sha256"},
            )
        request = self.downloads.check(
            url, {"sha256": sha256, "filename": filename, "size": size}, self.config
        )
        uid = await self.auth.authorize(call.sender, ACTIONS[(MANAGER, "DownloadImage")])
        self._check_job_limit(uid)
        return job_path(self.downloads.start(request, uid, self.config))

    def set_config(self, config: Config) -> None:
        self.config = config
        self.hardware.configure(config.hardware.sysfs_root, config.hardware.procfs_root)
        self.router.call_timeout = config.timeouts.call_s
        self.router.calls_per_sender = config.limits.calls_per_sender

    # ---- Hardware (reads: no authorization, API.md) --------------------------------------
    # The reads run in a thread: pci.ids is a 1.3 MB file, and a wedged sysfs read must not
    # stall the bus.

    async def _get_iommu_status(self, call: Call) -> dict[str, Variant]:
        status = await asyncio.to_thread(self.hardware.iommu_status)
        return {
            "enabled": Variant("b", status.enabled),
            "groups": Variant("u", status.groups),
            "cpu_vendor": Variant("s", status.cpu_vendor),
            "virtualization": Variant("b", status.virtualization),
            "kernel_param": Variant("s", status.kernel_param),
        }

    async def _list_gpus(self, call: Call) -> list[dict[str, Variant]]:
        return [gpu_dict(g) for g in await asyncio.to_thread(self.hardware.gpus)]

    async def _check_passthrough(self, call: Call, address: str) -> dict[str, Variant]:
        address = validate.pci_address(address)
        return readiness_dict(await asyncio.to_thread(self.hardware.check, address))

    # ---- VMs ----------------------------------------------------------------------------

    async def _authorize_vm(self, call: Call, action: str, vm: CoreVM) -> int:
        """The caller's uid if it may perform ``action`` (a polkit action id) on ``vm``.

        Every VM method authorizes through here: polkit gets the VM's name, UUID and owner.
        """
        return await self.auth.authorize(call.sender, action, vm.name, vm.uuid, vm.owner)

    def _vm_methods(self, vm: CoreVM) -> dict[str, Callable[..., Awaitable[Any]]]:
        core = self._core()

        def simple(action: Callable[[CoreVM], Awaitable[None]], name: str) -> Any:
            async def handler(call: Call) -> None:
                await self._authorize_vm(call, ACTIONS[(VM, name)], vm)
                await action(vm)

            return handler

        return {
            "Start": functools.partial(self._start, vm),
            "Shutdown": functools.partial(self._shutdown, vm),
            "SetAutostart": functools.partial(self._set_autostart, vm),
            "ForceOff": simple(core.force_off, "ForceOff"),
            "Reboot": simple(core.reboot, "Reboot"),
            "Reset": simple(core.reset, "Reset"),
            "Pause": simple(core.pause, "Pause"),
            "Resume": simple(core.resume, "Resume"),
            "Delete": functools.partial(bus_create.delete, self, vm),
            "GetDisplay": functools.partial(self._get_display, vm),
            "GuestPing": functools.partial(self._guest_ping, vm),
            "GuestInfo": functools.partial(self._guest_info, vm),
            "GuestExec": functools.partial(self._guest_exec, vm),
            "Rename": functools.partial(self._rename, vm),
            "SetMemory": functools.partial(self._set_memory, vm),
            "SetVCPUs": functools.partial(self._set_vcpus, vm),
            "ChangeMedia": functools.partial(self._change_media, vm),
            "EjectMedia": functools.partial(self._eject_media, vm),
        }

    async def _start(self, vm: CoreVM, call: Call, options: dict[str, Variant]) -> None:
        opts = validate.Options(unwrap(options), "Start")
        paused = opts.bool("paused")
        opts.done()
        await self._authorize_vm(call, ACTIONS[(VM, "Start")], vm)
        await self._core().start(vm, paused)

    async def _shutdown(self, vm: CoreVM, call: Call, options: dict[str, Variant]) -> str:
        opts = validate.Options(unwrap(options), "Shutdown")
        timeout_s = opts.uint("timeout_s", self.config.timeouts.shutdown_s, minimum=1, maximum=3600)
        force = opts.bool("force")
        opts.done()
        uid = await self._authorize_vm(call, ACTIONS[(VM, "Shutdown")], vm)
        self._check_job_limit(uid)
        return job_path(await self._core().shutdown(vm, uid, timeout_s, force))

    async def _set_autostart(self, vm: CoreVM, call: Call, enabled: bool) -> None:
        await self._authorize_vm(call, ACTIONS[(VM, "SetAutostart")], vm)
        await self._core().set_autostart(vm, enabled)

    # ---- changes after creation (issue 12) ------------------------------------------------

    async def _rename(self, vm: CoreVM, call: Call, new_name: str) -> None:
        new_name = validate.vm_name(new_name)
        await self._authorize_vm(call, ACTIONS[(VM, "Rename")], vm)
        await self._core().rename(vm, new_name)

    async def _set_memory(
        self, vm: CoreVM, call: Call, mib: int, options: dict[str, Variant]
    ) -> None:
        opts = validate.Options(unwrap(options), "SetMemory")
        live = opts.bool("live")
        opts.done()
        await self._authorize_vm(call, ACTIONS[(VM, "SetMemory")], vm)
        await self._core().set_memory(vm, mib, live)

    async def _set_vcpus(
        self, vm: CoreVM, call: Call, count: int, options: dict[str, Variant]
    ) -> None:
        opts = validate.Options(unwrap(options), "SetVCPUs")
        live = opts.bool("live")
        opts.done()
        await self._authorize_vm(call, ACTIONS[(VM, "SetVCPUs")], vm)
        await self._core().set_vcpus(vm, count, live)

    async def _change_media(self, vm: CoreVM, call: Call, iso: str) -> None:
        action = await self._authorize_media(vm, call, "ChangeMedia")
        # The path is looked at only for an authorized caller: its answers (exists, is a
        # file, where a symlink leads) must not tell anyone else about the file system.
        roots = self.config.storage.iso_roots
        async with files_lock:  # DeleteImage waits: the checked file stays until it is in use
            path = await asyncio.to_thread(_readable_iso, iso, roots)
            self._same_media_action(vm, "ChangeMedia", action)  # the waits above: again
            await self._core().change_media(vm, path)

    async def _eject_media(self, vm: CoreVM, call: Call) -> None:
        await self._authorize_media(vm, call, "EjectMedia")
        await self._core().change_media(vm, None)

    async def _authorize_media(self, vm: CoreVM, call: Call, member: str) -> str:
        action = media_action(member, vm.state)
        await self._authorize_vm(call, action, vm)
        self._same_media_action(vm, member, action)
        return action

    @staticmethod
    def _same_media_action(vm: CoreVM, member: str, action: str) -> None:
        """InvalidState if the VM started or stopped since ``action`` was authorized."""
        if media_action(member, vm.state) != action:
            raise InvalidStateError(
                f"VM {vm.name!r} became {vm.state} during the authorization of {member}; "
                "try again.",
                details={"vm": vm.name, "state": vm.state},
            )

    # ---- images (issue 12) -----------------------------------------------------------------

    def _images(self) -> Images:
        core = self._core()
        return Images(core.backend, core.vms, self.creator.creating if self.creator else {})

    async def _list_images(self, call: Call) -> list[dict[str, Variant]]:
        await self.auth.authorize(call.sender, ACTIONS[(MANAGER, "ListImages")])
        storage = self.config.storage
        out = []
        for image in await self._images().list_images(storage.image_dir, storage.state_dir):
            row = {
                "name": Variant("s", image.name),
                "size": Variant("t", image.size),
                "used_by": Variant("ao", [vm_path(u) for u in image.used_by]),
            }
            if image.sha256:
                row["sha256"] = Variant("s", image.sha256)
            out.append(row)
        return out

    async def _delete_image(self, call: Call, name: str) -> None:
        name = check_name(name)
        await self.auth.authorize(call.sender, ACTIONS[(MANAGER, "DeleteImage")])
        downloading = self.downloads.downloading(name) if self.downloads is not None else None
        storage = self.config.storage
        await self._images().delete_image(storage.image_dir, storage.state_dir, name, downloading)

    # ---- guest agent and display (replies within call_s: GuestExec's run is bounded) ----

    async def _get_display(self, vm: CoreVM, call: Call) -> dict[str, Variant]:
        await self._authorize_vm(call, ACTIONS[(VM, "GetDisplay")], vm)
        d = await self._core().display(vm)
        out = {"kind": Variant("s", d.kind)}
        if d.shm_path:
            out["shm_path"] = Variant("s", d.shm_path)
        if d.uri:
            out["uri"] = Variant("s", d.uri)
        if d.fallback_reason:
            out["fallback_reason"] = Variant("s", d.fallback_reason)
        return out

    async def _guest_ping(self, vm: CoreVM, call: Call) -> None:
        await self._authorize_vm(call, ACTIONS[(VM, "GuestPing")], vm)
        await self._core().guest_ping(vm, self.config.timeouts.guest_agent_s)

    async def _guest_info(self, vm: CoreVM, call: Call) -> dict[str, Variant]:
        await self._authorize_vm(call, ACTIONS[(VM, "GuestInfo")], vm)
        info = await self._core().guest_info(vm, self.config.timeouts.guest_agent_s)
        return {
            "os": Variant("s", info.os),
            "kernel": Variant("s", info.kernel),
            "hostname": Variant("s", info.hostname),
            "agent_version": Variant("s", info.agent_version),
        }

    async def _guest_exec(
        self, vm: CoreVM, call: Call, path: str, args: list[str], options: dict[str, Variant]
    ) -> list[Any]:
        path, argv = validate.guest_command(path, args)
        opts = validate.Options(unwrap(options), "GuestExec")
        t = self.config.timeouts
        timeout_s = opts.uint(
            "timeout_s", math.ceil(t.guest_agent_s), minimum=1, maximum=math.floor(t.call_s)
        )
        stdin = opts.blob("stdin", max_length=MAX_EXEC_STDIN)
        opts.done()
        await self._authorize_vm(call, ACTIONS[(VM, "GuestExec")], vm)
        # The reply must come within call_s: leave room for the kill after a timeout.
        run_s = max(1.0, min(float(timeout_s), t.call_s - EXEC_REPLY_MARGIN_S))
        request = ExecRequest(path, argv, stdin, run_s)
        result = await self._core().guest_exec(vm, request, t.guest_agent_s)
        return [result.exit_code, result.stdout, result.stderr]

    def _check_job_limit(self, uid: int) -> None:
        assert self.jobs is not None
        limit = self.config.limits.jobs_per_sender
        if self.jobs.count_for_uid(uid) >= limit:
            raise LimitExceededError(
                f"User {uid} already runs {limit} jobs; wait for one to end.",
                details={"limit": limit, "uid": uid},
            )

    def vm_added(self, vm: CoreVM) -> None:
        props = vm.properties
        self.router.add(
            vm_path(vm.uuid),
            [
                Exported(
                    VM_IFACE,
                    lambda: {VM_PROPS[k]: v for k, v in props().items()},
                    self._vm_methods(vm),
                    signalled=True,  # the core reports every change: vm_changed below
                )
            ],
        )

    def vm_changed(self, vm: CoreVM, changed: dict[str, Any]) -> None:
        self.router.properties_changed(
            vm_path(vm.uuid), VM, {VM_PROPS[k]: v for k, v in changed.items()}
        )

    def vm_removed(self, vm: CoreVM) -> None:
        self.router.remove(vm_path(vm.uuid))

    def connection_changed(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self.router.properties_changed(MANAGER_PATH, MANAGER, {"Connected": connected})

    # ---- jobs ---------------------------------------------------------------------------

    def _job_props(self, job: Job) -> dict[str, Any]:
        return {
            "Operation": job.operation,
            "State": job.state.value,
            "Progress": job.progress,
            "ProgressValid": job.progress_valid,
            "Bytes": job.bytes,
            "TotalBytes": job.total_bytes,
            "Rate": job.rate,
            "StartTime": job.start_time_us,
            "Cancelable": job.cancelable,
            "Objects": [vm_path(u) for u in job.objects],
            "StartedByUID": job.started_by_uid,
            "ErrorName": job.error_name,
            "ErrorMessage": job.error_message,
        }

    async def _cancel(self, job: Job, call: Call) -> None:
        uid = await self.auth.uid(call.sender)
        if uid != job.started_by_uid:
            await self.auth.authorize(call.sender, ACTIONS[(JOB, "Cancel")])
        if not job.cancel():
            raise InvalidStateError(
                f"Job {job.number} ({job.operation}) has already ended ({job.state}).",
                details={"job": job.number},
            )

    def job_added(self, job: Job) -> None:
        self.router.add(
            job_path(job),
            [
                Exported(
                    JOB_IFACE,
                    functools.partial(self._job_props, job),
                    {"Cancel": functools.partial(self._cancel, job)},
                )
            ],
        )

    def job_changed(self, job: Job, changed: dict[str, Any]) -> None:
        props = self._job_props(job)
        names = {
            "operation": "Operation",
            "state": "State",
            "progress": "Progress",
            "progress_valid": "ProgressValid",
            "bytes": "Bytes",
            "total_bytes": "TotalBytes",
            "rate": "Rate",
            "cancelable": "Cancelable",
            "objects": "Objects",
        }
        out = {names[k]: props[names[k]] for k in changed if k in names}
        if "state" in changed and job.error is not None:
            out["ErrorName"], out["ErrorMessage"] = job.error_name, job.error_message
        self.router.properties_changed(job_path(job), JOB, out)

    def job_completed(self, job: Job) -> None:
        self.router.signal(
            job_path(job),
            JOB,
            "Completed",
            "bss",
            [job.error is None, job.error_name, job.error_message],
        )

    def job_removed(self, job: Job) -> None:
        self.router.remove(job_path(job))
