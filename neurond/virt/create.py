"""The host side of creating and deleting VMs: storage through libvirt's pool and volume API,
per-VM NVRAM and Looking Glass shm files, define/undefine, and what the host can give a VM
(firmware, swtpm, domain type). Implements neurond.core.create.Provisioner.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt

from neurond.config import Config
from neurond.core.create import Creator, DeletePlan, Plan, RecordStore
from neurond.core.service import VMService
from neurond.domain.build import Firmware, HostFacts
from neurond.domain.spec import Settings
from neurond.errors import (
    MissingDependencyError,
    OperationFailedError,
    VMCreationFailedError,
    VMNotFoundError,
)
from neurond.virt.backend import LibvirtBackend

_log = logging.getLogger("neurond.virt.create")

# (code, NVRAM template) per distribution: Debian/Ubuntu (ovmf), Arch (edk2-ovmf), Fedora.
SECURE_FIRMWARE = (
    ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.secboot.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd", "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd"),
)
PLAIN_FIRMWARE = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
VIRTIO_WIN = "virtio-win.iso"
UNDEFINE_ALL = (
    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_TPM
)
# What drivers without NVRAM/TPM support (the test driver) accept; neurond removes NVRAM itself.
UNDEFINE_BASIC = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)


@dataclass(frozen=True)
class CreateConfig:
    image_dir: Path
    iso_roots: tuple[Path, ...]
    domain_type: str  # auto | kvm | qemu
    network: str
    shm_dir: Path = Path("/dev/shm")


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _domain_files(xml: str) -> tuple[list[str], str]:
    """(paths of the writable, unshared disks, NVRAM path) of a domain's XML."""
    root = ET.fromstring(xml)
    disks = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue  # CD-ROMs (a shared ISO) and floppies are never the VM's own
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if path:
            disks.append(path)
    return disks, (root.findtext("./os/nvram") or "").strip()


class LibvirtProvisioner:
    """Creates and removes what a VM is made of, on the backend's connection and executor."""

    def __init__(self, backend: LibvirtBackend, config: CreateConfig) -> None:
        self.backend = backend
        self.config = config
        self._pool_lock = asyncio.Lock()

    # ---- host facts ---------------------------------------------------------------------

    async def host_facts(self, settings: Settings) -> HostFacts:
        return await asyncio.to_thread(self._host_facts, settings)

    def _host_facts(self, s: Settings) -> HostFacts:
        firmware = None
        if s.uefi:
            candidates = SECURE_FIRMWARE if s.secure_boot else PLAIN_FIRMWARE
            found = next(
                (c for c in candidates if Path(c[0]).is_file() and Path(c[1]).is_file()), None
            )
            if found is None:
                what = "secure-boot UEFI firmware" if s.secure_boot else "UEFI firmware"
                raise MissingDependencyError(
                    f"The {what} (OVMF) is not installed: install the 'ovmf' package "
                    "(Arch: 'edk2-ovmf').",
                    details={"dependency": "ovmf"},
                )
            firmware = Firmware(found[0], found[1], s.secure_boot)
        if s.tpm and shutil.which("swtpm") is None:
            raise MissingDependencyError(
                "The TPM emulator swtpm is not installed: install the 'swtpm' package.",
                details={"dependency": "swtpm"},
            )
        kind = self.config.domain_type
        if kind == "auto":
            kind = "kvm" if _kvm_usable() else "qemu"
        virtio_win = ""
        if s.profile.windows:
            for root in self.config.iso_roots:
                candidate = root / VIRTIO_WIN
                if candidate.is_file():
                    virtio_win = str(candidate.resolve())
                    break
        return HostFacts(
            domain_type=kind, network=self.config.network, firmware=firmware, virtio_win=virtio_win
        )

    def plan(self, uuid: str, settings: Settings, host: HostFacts) -> Plan:
        image_dir = self.config.image_dir
        stem = f"{settings.name}-{uuid}"
        return Plan(
            uuid=uuid,
            name=settings.name,
            pool_dir=str(image_dir),
            volume=f"{stem}.qcow2",
            capacity_gib=settings.disk_gib,
            nvram=str(image_dir / f"{stem}_VARS.fd") if host.firmware else "",
            nvram_template=host.firmware.vars_template if host.firmware else "",
            shm=str(self.config.shm_dir / f"looking-glass-{uuid}")
            if settings.looking_glass
            else "",
        )

    # ---- storage ------------------------------------------------------------------------

    @staticmethod
    def _find_pool(conn: libvirt.virConnect, directory: str) -> libvirt.virStoragePool | None:
        for pool in conn.listAllStoragePools(0):
            try:
                path = ET.fromstring(pool.XMLDesc(0)).findtext("./target/path")
            except ET.ParseError:
                continue
            if path and os.path.normpath(path) == os.path.normpath(directory):
                return pool
        return None

    def _pool(self, conn: libvirt.virConnect, directory: str) -> libvirt.virStoragePool:
        """The active pool of ``directory``; a transient one is made if none exists (the
        configuration is the truth, so nothing lingers in libvirt's config)."""
        pool = self._find_pool(conn, directory)
        if pool is None:
            os.makedirs(directory, mode=0o711, exist_ok=True)
            name = "neurond-" + hashlib.sha256(directory.encode()).hexdigest()[:12]
            xml = ET.Element("pool", type="dir")
            ET.SubElement(xml, "name").text = name
            ET.SubElement(ET.SubElement(xml, "target"), "path").text = directory
            pool = conn.storagePoolCreateXML(ET.tostring(xml, encoding="unicode"), 0)
        elif not pool.isActive():
            pool.create(0)
        return pool

    async def create_volume(self, pool_dir: str, name: str, capacity_gib: int) -> str:
        def create(conn: libvirt.virConnect) -> str:
            pool = self._pool(conn, pool_dir)
            pool.refresh(0)
            vol = ET.Element("volume")
            ET.SubElement(vol, "name").text = name
            ET.SubElement(vol, "capacity", unit="GiB").text = str(capacity_gib)
            target = ET.SubElement(vol, "target")
            ET.SubElement(target, "format", type="qcow2")
            ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = "0600"
            return str(pool.createXML(ET.tostring(vol, encoding="unicode"), 0).path())

        async with self._pool_lock:
            return await self.backend._call(
                "virt.create_volume",
                VMCreationFailedError,
                f"create the disk volume {name}",
                "",
                create,
            )

    async def delete_volume(self, pool_dir: str, name: str) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            pool = self._pool(conn, pool_dir)
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
            try:
                vol = pool.storageVolLookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    return
                raise
            vol.delete(0)

        async with self._pool_lock:
            await self.backend._call(
                "virt.delete_volume",
                OperationFailedError,
                f"remove the disk volume {name}",
                "",
                delete,
            )
        # a driver that keeps volumes in memory (test) leaves a real file alone; remove ours
        await self.remove_file(str(Path(pool_dir) / name))

    # ---- files --------------------------------------------------------------------------

    async def copy_file(self, template: str, path: str) -> None:
        def copy() -> None:
            with open(template, "rb") as src:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())

        try:
            await asyncio.to_thread(copy)
        except OSError as e:
            raise VMCreationFailedError(
                f"Could not create the NVRAM file {path}: {e.strerror}.",
                details={"path": path},
            ) from None

    async def create_shm(self, path: str, size_mib: int) -> None:
        def create() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
            try:
                # QEMU (group kvm) maps it, the Looking Glass client reads it
                with contextlib.suppress(KeyError, PermissionError):
                    os.fchown(fd, -1, grp.getgrnam("kvm").gr_gid)
                os.fchmod(fd, 0o660)
                os.ftruncate(fd, size_mib * 2**20)
            finally:
                os.close(fd)

        try:
            await asyncio.to_thread(create)
        except OSError as e:
            raise VMCreationFailedError(
                f"Could not create the Looking Glass shared memory {path}: {e.strerror}.",
                details={"path": path},
            ) from None

    async def remove_file(self, path: str) -> None:
        def remove() -> None:
            # A read-only directory fails unlink with EROFS even when the file is not there.
            if not os.path.lexists(path):
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        try:
            await asyncio.to_thread(remove)
        except OSError as e:
            raise OperationFailedError(
                f"Could not remove {path}: {e.strerror}.", details={"path": path}
            ) from None

    # ---- domain -------------------------------------------------------------------------

    async def define(self, xml: str) -> None:
        await self.backend._call(
            "virt.define",
            VMCreationFailedError,
            "define the new VM",
            "",
            lambda c: c.defineXML(xml),
        )

    async def undefine(self, uuid: str) -> None:
        def undefine(conn: libvirt.virConnect) -> None:
            try:
                remove(conn.lookupByUUIDString(uuid))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # gone counts as removed
                    raise

        def remove(dom: libvirt.virDomain) -> None:
            # A rolled-back create was never started, a delete has stopped its VM: be sure
            # (a delete finished at start may find it running). Never undefine a running
            # domain: libvirt would keep it running as a transient one.
            for attempt in range(3):
                try:
                    dom.destroy()
                except libvirt.libvirtError:
                    if not dom.isActive():
                        break
                    if attempt == 2:
                        raise
                else:
                    break
            self._undefine(dom)

        await self.backend._call("virt.undefine", OperationFailedError, "undefine", uuid, undefine)

    @staticmethod
    def _undefine(dom: libvirt.virDomain) -> None:
        try:
            dom.undefineFlags(UNDEFINE_ALL)
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                raise
            dom.undefineFlags(UNDEFINE_BASIC)

    async def set_autostart(self, uuid: str, enabled: bool) -> None:
        await self.backend._call(
            "virt.set_autostart",
            VMCreationFailedError,
            "set autostart of",
            uuid,
            lambda c: c.lookupByUUIDString(uuid).setAutostart(1 if enabled else 0),
        )

    @staticmethod
    def _disks_of_others(conn: libvirt.virConnect, owner: str) -> set[str]:
        """The disk paths of every domain but ``owner``."""
        used: set[str] = set()
        for other in conn.listAllDomains(0):
            if other.UUIDString() != owner:
                with contextlib.suppress(libvirt.libvirtError):
                    used.update(_domain_files(other.XMLDesc(0))[0])
        return used

    async def delete_plan(self, uuid: str, name: str, delete_storage: bool) -> DeletePlan:
        image_dir = os.path.realpath(self.config.image_dir)
        shm = str(self.config.shm_dir / f"looking-glass-{uuid}")

        def plan(conn: libvirt.virConnect) -> DeletePlan:
            dom = conn.lookupByUUIDString(uuid)
            disks, nvram = _domain_files(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            volumes = []
            if delete_storage:
                used_elsewhere = self._disks_of_others(conn, uuid)
                for path in disks:
                    if path in used_elsewhere:
                        _log.info("Keeping %s: another VM uses it", path)
                        continue
                    try:
                        volumes.append(str(conn.storageVolLookupByPath(path).path()))
                    except libvirt.libvirtError:
                        _log.info("Keeping %s: it is not a libvirt storage volume", path)
            files = []
            # Drivers without NVRAM support in undefine (test) leave the file: remove ours.
            if nvram and os.path.realpath(os.path.dirname(nvram)) == image_dir:
                files.append(nvram)
            if os.path.lexists(shm):
                files.append(shm)
            return DeletePlan(uuid=uuid, name=name, volumes=volumes, files=files)

        try:
            return await self.backend._call(
                "virt.delete", OperationFailedError, "delete", uuid, plan
            )
        except VMNotFoundError:
            raise VMNotFoundError(
                f"Could not delete: the VM {uuid} no longer exists.", details={"uuid": uuid}
            ) from None

    async def delete_volume_at(self, path: str, owner: str) -> bool:
        in_image_dir = os.path.realpath(os.path.dirname(path)) == os.path.realpath(
            self.config.image_dir
        )

        def delete(conn: libvirt.virConnect) -> str:
            if path in self._disks_of_others(conn, owner):
                return "another VM uses it"
            if in_image_dir:  # the pool may be gone (transient, libvirtd restarted): again
                with contextlib.suppress(libvirt.libvirtError):
                    self._pool(conn, os.path.dirname(path)).refresh(0)
            try:
                vol = conn.storageVolLookupByPath(path)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
                if os.path.lexists(path) and not in_image_dir:
                    return "libvirt no longer knows it as a storage volume"
                return ""
            vol.delete(0)
            return ""

        async with self._pool_lock:
            kept = await self.backend._call(
                "virt.delete_volume",
                OperationFailedError,
                f"remove the disk volume {path}",
                "",
                delete,
            )
        if kept:
            _log.warning("Keeping %s: %s", path, kept, extra={"fields": {"NEUROND_PATH": path}})
            return False
        # a driver that keeps volumes in memory (test) leaves a real file alone; remove ours
        if in_image_dir:
            await self.remove_file(path)
        return True


def make_creator(
    service: VMService, backend: LibvirtBackend, config: Callable[[], Config]
) -> Creator:
    """The core's Creator on this backend, with the storage settings of the configuration."""
    cfg = config()
    provisioner = LibvirtProvisioner(
        backend,
        CreateConfig(
            image_dir=cfg.storage.image_dir,
            iso_roots=cfg.storage.iso_roots,
            domain_type=cfg.libvirt.domain_type,
            network=cfg.libvirt.network,
        ),
    )
    return Creator(
        service,
        provisioner,
        RecordStore(
            cfg.storage.state_dir,
            (provisioner.config.image_dir, provisioner.config.shm_dir),  # what delete_plan names
        ),
        lambda: config().timeouts.shutdown_s,
    )
