"""CreateVM and Delete on the bus: parse the spec → authorize → check what the host can give
(ISO roots, GPU/IOMMU) → the core's create/delete job. Nothing is written before the core runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from dbus_fast import Variant

from neurond import validate
from neurond.bus.router import Call
from neurond.core.create import SPEC_KEYS, Creator, Settings, settings_from
from neurond.core.images import files_lock
from neurond.core.states import Method
from neurond.core.vm import VM as CoreVM

if TYPE_CHECKING:
    from neurond.bus.service import BusService

ACTION = "vm-manage"  # API.md: CreateVM and Delete


def _unwrap(options: dict[str, Variant]) -> dict[str, tuple[str, Any]]:
    return {k: (v.signature, v.value) for k, v in options.items()}


def read_spec(spec: dict[str, Variant]) -> Settings:
    """The CreateVM spec, typed (any fitting integer type) and checked; unknown keys fail."""
    raw = _unwrap(spec)
    opts = validate.Options(raw, "CreateVM")
    values: dict[str, Any] = {}
    for key, kind in SPEC_KEYS.items():
        if key not in raw:
            continue
        if kind is bool:
            values[key] = opts.bool(key)
        elif kind is int:
            values[key] = opts.uint(key, 0)
        else:
            values[key] = opts.str(key)
    opts.done()
    return settings_from(values)


def _confine(settings: Settings, svc: BusService) -> Settings:
    roots = svc.config.storage.iso_roots

    def real(key: str) -> str:
        value: str = getattr(settings, key)
        return validate.file_under_roots(value, roots, key) if value else ""

    return dataclasses.replace(
        settings, iso=real("iso"), kernel=real("kernel"), initrd=real("initrd")
    )


def _gpu_functions(svc: BusService, address: str) -> tuple[str, ...]:
    """The GPU and the other functions of its PCI slot (its HDMI audio)."""
    gpu = svc.hardware.require_ready(address)
    slot = gpu.address.rsplit(".", 1)[0]
    others = sorted(d for d in gpu.group_devices if d.rsplit(".", 1)[0] == slot)
    return (gpu.address, *(d for d in others if d != gpu.address))


def _creator(svc: BusService) -> Creator:
    assert svc.creator is not None, "the daemon sets the creator"
    return svc.creator


async def create_vm(svc: BusService, call: Call, spec: dict[str, Variant]) -> list[str]:
    from neurond.bus.service import job_path, vm_path

    settings = read_spec(spec)
    uid = await svc.auth.authorize(call.sender, ACTION, settings.name)
    svc._check_job_limit(uid)
    # DeleteImage waits meanwhile: the ISO, kernel and initrd checked here stay until the new
    # VM is registered, from when on they count as used (Creator.creating).
    async with files_lock:
        settings = await asyncio.to_thread(_confine, settings, svc)
        hostdevs: tuple[str, ...] = ()
        if settings.gpu:
            hostdevs = await asyncio.to_thread(_gpu_functions, svc, settings.gpu)
        vm, job = await _creator(svc).create(settings, hostdevs, uid)
    return [vm_path(vm.uuid), job_path(job)]


async def delete(svc: BusService, vm: CoreVM, call: Call, options: dict[str, Variant]) -> str:
    from neurond.bus.service import job_path

    opts = validate.Options(_unwrap(options), "Delete")
    delete_storage = opts.bool("delete_storage")
    force = opts.bool("force")
    opts.done()
    uid = await svc._authorize_vm(call, ACTION, vm)
    joining = vm.op is not None and vm.op.method in (Method.DELETE, Method.DELETE_FORCE)
    if not joining:
        svc._check_job_limit(uid)
    return job_path(await _creator(svc).delete(vm, uid, delete_storage, force))
