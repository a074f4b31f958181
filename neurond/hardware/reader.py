"""The hardware facade the bus (and CreateVM) use: IOMMU status, GPUs and their readiness.

Everything is read again on every call: sysfs is cheap (well under a millisecond for a
desktop's PCI tree), and a GPU can be hot-plugged or rebound to another driver between two
calls. Only the pci.ids names are kept (until that file changes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from neurond import validate
from neurond.errors import GPUNotFoundError, IOMMUError
from neurond.hardware import files, pci
from neurond.hardware.iommu import IOMMUStatus, read_status
from neurond.hardware.pciids import PciIds
from neurond.hardware.readiness import GroupMember, Readiness, assess

_log = logging.getLogger("neurond.hardware")
_MAX_NOTED = 1024


@dataclass(frozen=True)
class GPU:
    """One GPU as API.md's ListGPUs describes it."""

    address: str
    vendor_id: str
    device_id: str
    vendor: str
    name: str
    class_code: str  # 6 lowercase hex digits
    driver: str
    iommu_group: int
    boot_vga: bool
    group_devices: tuple[str, ...]
    readiness: Readiness


@dataclass(frozen=True)
class _Roots:
    sysfs: Path
    procfs: Path

    @property
    def devices(self) -> Path:
        return self.sysfs / "bus" / "pci" / "devices"

    def group_devices(self, group: int) -> Path:
        return self.sysfs / "kernel" / "iommu_groups" / str(group) / "devices"


class HardwareReader:
    """Reads the host's PCI GPUs and IOMMU under the configured sysfs and procfs roots."""

    def __init__(self, sysfs_root: Path, procfs_root: Path, pci_ids: PciIds | None = None) -> None:
        self._roots = _Roots(Path(sysfs_root), Path(procfs_root))
        self.pci_ids = pci_ids if pci_ids is not None else PciIds()
        self._noted: set[str] = set()

    def configure(self, sysfs_root: Path, procfs_root: Path) -> None:
        """New roots (a reloaded configuration), used from the next call on."""
        self._roots = _Roots(Path(sysfs_root), Path(procfs_root))

    # ---- API.md's Hardware interface ----------------------------------------------------

    def iommu_status(self) -> IOMMUStatus:
        roots = self._roots
        return read_status(roots.sysfs, roots.procfs)

    def gpus(self, names: bool = True) -> list[GPU]:
        """Every GPU, sorted by address; devices that cannot be read are left out (and logged)."""
        roots = self._roots
        iommu = read_status(roots.sysfs, roots.procfs)
        found = []
        for address in files.list_dir(roots.devices):
            device_dir = roots.devices / address
            if not pci.is_address(address):
                self._note(f"{roots.devices} holds {address!r}, not a PCI address; skipped")
                continue
            class_code = pci.read_class(device_dir)
            if class_code is None:
                self._note(f"PCI device {address} is skipped: its class is unreadable")
                continue
            if class_code >> 8 not in pci.GPU_CLASSES:
                continue
            try:
                found.append(pci.read_device(device_dir, address, class_code))
            except pci.Unreadable as e:
                self._note(f"GPU {address} is skipped: {e} (in {device_dir})")
        return self._describe(roots, iommu, found, names)

    def gpu(self, address: str) -> GPU:
        """The GPU at ``address``; GPUNotFoundError when there is none or it is no GPU."""
        address = validate.pci_address(address)  # again: only a valid address becomes a path
        roots = self._roots
        iommu = read_status(roots.sysfs, roots.procfs)
        device_dir = roots.devices / address
        if not files.exists(device_dir):
            raise GPUNotFoundError(
                f"There is no PCI device at {address}; ListGPUs shows the GPUs of this machine.",
                details={"address": address},
            )
        try:
            device = pci.read_device(device_dir, address)
        except pci.Unreadable as e:
            raise GPUNotFoundError(
                f"The PCI device at {address} cannot be read ({e}), so neurond cannot use it "
                "as a GPU.",
                details={"address": address},
            ) from None
        if not device.is_gpu:
            raise GPUNotFoundError(
                f"The PCI device at {address} is a {pci.class_name(device.class_code)}, not a GPU.",
                details={"address": address, "class": f"{device.class_code:06x}"},
            )
        return self._describe(roots, iommu, [device], names=True)[0]

    def check(self, address: str) -> Readiness:
        """CheckPassthrough: readiness of the GPU at ``address`` (GPUNotFoundError if none)."""
        return self.gpu(address).readiness

    def any_ready(self) -> bool:
        """Whether at least one GPU can be passed through now (the gpu-passthrough feature)."""
        return any(g.readiness.ready for g in self.gpus(names=False))

    def require_ready(self, address: str) -> GPU:
        """For CreateVM's ``gpu``: IOMMUError when the IOMMU is off, GPUNotFoundError when there
        is no such GPU or it is not ready."""
        iommu = self.iommu_status()
        if not iommu.enabled:
            raise IOMMUError(
                iommu.off_reason(),
                details={"kernel_param": iommu.kernel_param, "address": address[:64]},
            )
        gpu = self.gpu(address)
        if not gpu.readiness.ready:
            raise GPUNotFoundError(
                f"The GPU at {gpu.address} cannot be passed through: "
                + " ".join(gpu.readiness.reasons),
                details={"address": gpu.address},
            )
        return gpu

    # ---- internals ----------------------------------------------------------------------

    def _describe(
        self, roots: _Roots, iommu: IOMMUStatus, devices: list[pci.PciDevice], names: bool
    ) -> list[GPU]:
        table = self.pci_ids.names((d.vendor_id, d.device_id) for d in devices) if names else {}
        out = []
        for d in devices:
            group = self._group(roots, d)
            vendor, name = table.get((d.vendor_id, d.device_id), ("", ""))
            out.append(
                GPU(
                    address=d.address,
                    vendor_id=d.vendor_id,
                    device_id=d.device_id,
                    vendor=vendor,
                    name=name,
                    class_code=f"{d.class_code:06x}",
                    driver=d.driver,
                    iommu_group=d.iommu_group,
                    boot_vga=bool(d.boot_vga),
                    group_devices=tuple(m.address for m in group or ()),
                    readiness=assess(d, iommu, group),
                )
            )
        return out

    def _group(self, roots: _Roots, device: pci.PciDevice) -> list[GroupMember] | None:
        """The other devices of ``device``'s IOMMU group; None when the group cannot be read
        (a group always lists its own members, so one that misses the device is unreadable)."""
        if device.iommu_group < 0:
            return []
        names = files.list_dir(roots.group_devices(device.iommu_group))
        if device.address not in names:
            self._note(
                f"IOMMU group {device.iommu_group} of {device.address} cannot be read "
                f"({roots.group_devices(device.iommu_group)})",
            )
            return None
        return [
            GroupMember(
                address=name,
                class_code=pci.read_class(roots.devices / name),
                driver=files.link_name(roots.devices / name / "driver") or "",
            )
            for name in names
            if name != device.address and pci.is_address(name)
        ]

    def _note(self, message: str) -> None:
        """Log a problem of the tree once (every call reads the tree again)."""
        if message in self._noted:
            return
        if len(self._noted) >= _MAX_NOTED:
            self._noted.clear()
        self._noted.add(message)
        _log.warning("%s", message)
