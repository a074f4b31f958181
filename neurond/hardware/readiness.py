"""Whether one GPU can be passed through, in words a person can act on.

``reasons`` block passthrough (API.md: IOMMU off, boot display, a group shared with other
devices); ``warnings`` do not (a host driver libvirt will detach, a known reset bug, sibling
functions that leave the host with the GPU). Pure functions over what ``pci`` and ``iommu``
read, so every sentence is tested without a machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neurond.hardware.iommu import IOMMUStatus
from neurond.hardware.pci import BRIDGE_CLASSES, PciDevice, class_name

# Drivers that hold a device for a VM rather than use it on the host.
VFIO_DRIVERS = frozenset({"vfio-pci", "pci-stub"})

# GPUs with a known reset bug: once a VM has used one, it often cannot be reset for the next
# start and stays dead until the host reboots. The ids are the discrete GPUs the vendor-reset
# kernel module (github.com/gnif/vendor-reset, src/device-db.h) has a reset quirk for.
_RESET_BUG_FAMILIES: dict[str, tuple[str, ...]] = {
    "AMD Polaris 10": ("67c0", "67c1", "67c2", "67c4", "67c7", "67c8", "67c9", "67ca",
                       "67cc", "67cf", "67d0", "67df", "6fdf"),
    "AMD Polaris 11": ("67e0", "67e1", "67e3", "67e7", "67e8", "67e9", "67eb", "67ef", "67ff"),
    "AMD Polaris 12": ("6980", "6981", "6985", "6986", "6987", "6995", "6997", "699f"),
    "AMD Vega 10": ("6860", "6861", "6862", "6863", "6864", "6867", "6868", "6869", "686a",
                    "686b", "686c", "686d", "686e", "686f", "687f"),
    "AMD Vega 20": ("66a0", "66a1", "66a2", "66a3", "66a4", "66a7", "66af"),
    "AMD Arcturus": ("738c",),
    "AMD Navi 10": ("7310", "7312", "7318", "7319", "731a", "731b", "731e", "731f"),
    "AMD Navi 12": ("7360", "7362"),
    "AMD Navi 14": ("7340", "7341", "7347", "734f"),
}  # fmt: skip
RESET_BUG: dict[tuple[str, str], str] = {
    ("1002", device): family
    for family, devices in _RESET_BUG_FAMILIES.items()
    for device in devices
}
_LISTED = 6  # devices named in one sentence; the rest are counted


@dataclass(frozen=True)
class GroupMember:
    """Another device of the GPU's IOMMU group."""

    address: str
    class_code: int | None  # None: unreadable
    driver: str


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]


def _is_bridge(member: GroupMember) -> bool:
    return member.class_code is not None and member.class_code >> 8 in BRIDGE_CLASSES


def _names(members: Sequence[GroupMember]) -> str:
    shown = [f"{m.address} ({class_name(m.class_code)})" for m in members[:_LISTED]]
    if len(members) > _LISTED:
        shown.append(f"{len(members) - _LISTED} more")
    return ", ".join(shown[:-1]) + (" and " if len(shown) > 1 else "") + shown[-1]


def assess(gpu: PciDevice, iommu: IOMMUStatus, group: Sequence[GroupMember] | None) -> Readiness:
    """``group``: the other devices of the GPU's IOMMU group, None when they cannot be read."""
    reasons: list[str] = []
    warnings: list[str] = []
    if not iommu.enabled:
        reasons.append(iommu.off_reason())
    elif gpu.iommu_group < 0:
        reasons.append(
            "It is in no IOMMU group, so the IOMMU cannot isolate it for a VM; check that the "
            "firmware setup and the kernel command line do not exclude it from the IOMMU."
        )
    elif group is None:
        reasons.append(
            f"neurond cannot read the devices of its IOMMU group {gpu.iommu_group}, so it "
            "cannot tell whether the GPU can be given to a VM on its own."
        )
    if gpu.boot_vga:
        reasons.append(
            "It is the boot display, so the host would lose its screen: connect the monitor to "
            "another GPU and make that one the primary display in the firmware setup."
        )
    elif gpu.boot_vga is None:
        reasons.append(
            "neurond cannot read whether it is the boot display (its boot_vga attribute), so "
            "it must assume the host needs it."
        )
    if iommu.enabled and group:
        siblings = [m for m in group if m.address[:-2] == gpu.slot]
        others = [m for m in group if m.address[:-2] != gpu.slot and not _is_bridge(m)]
        if others:
            reasons.append(
                f"Its IOMMU group {gpu.iommu_group} also holds {_names(others)}, which would "
                "have to be given to the VM with it; try the GPU in another PCIe slot (one "
                "wired to the CPU usually has a group of its own)."
            )
        if siblings:
            many = len(siblings) > 1
            warnings.append(
                f"The host loses its other function{'s' if many else ''} {_names(siblings)} "
                f"too while the VM runs: {'they are' if many else 'it is'} in the same IOMMU "
                "group."
            )
    if gpu.driver and gpu.driver not in VFIO_DRIVERS:
        warnings.append(
            f"The host driver {gpu.driver} uses it now; libvirt detaches it when the VM "
            "starts, so the host cannot use the GPU while the VM runs."
        )
    family = RESET_BUG.get((gpu.vendor_id, gpu.device_id))
    if family:
        warnings.append(
            f"{family} GPUs ({gpu.vendor_id}:{gpu.device_id}) have a known reset bug: after "
            "the VM stops, the GPU may not work again until the host reboots (the "
            "vendor-reset kernel module works around it)."
        )
    return Readiness(not reasons, tuple(reasons), tuple(warnings))
