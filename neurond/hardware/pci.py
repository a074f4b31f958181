"""PCI devices as sysfs shows them under ``bus/pci/devices``.

Every device directory there is named by its address; only names that are PCI addresses are
used to build paths. Attribute formats are the kernel's: ``class`` is ``0x030000``,
``vendor``/``device`` are ``0x10de``; ``driver`` and ``iommu_group`` are symlinks whose last
component names the driver and the group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from neurond.hardware import files
from neurond.validate import PCI_ADDRESS_RE

# Base class and subclass (class >> 8) of the devices neurond calls GPUs.
GPU_CLASSES = frozenset({0x0300, 0x0302, 0x0380})
# Devices that may share a GPU's IOMMU group without being passed through with it:
# PCI bridges (0x0604), and host bridges (0x0600) such as the "PCIe Dummy Host Bridge" that
# first-generation Ryzen puts in the group of its GPP bridge; neither is given to a guest.
BRIDGE_CLASSES = frozenset({0x0600, 0x0604})

# Names for the classes a reason may have to mention (pci.ids' class list, abridged).
CLASS_NAMES = {
    0x0100: "SCSI storage controller",
    0x0101: "IDE interface",
    0x0104: "RAID bus controller",
    0x0106: "SATA controller",
    0x0107: "Serial Attached SCSI controller",
    0x0108: "Non-Volatile memory controller",
    0x0180: "Mass storage controller",
    0x0200: "Ethernet controller",
    0x0280: "Network controller",
    0x0300: "VGA compatible controller",
    0x0302: "3D controller",
    0x0380: "Display controller",
    0x0400: "Multimedia video controller",
    0x0401: "Multimedia audio controller",
    0x0403: "Audio device",
    0x0480: "Multimedia controller",
    0x0500: "RAM memory",
    0x0580: "Memory controller",
    0x0600: "Host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0680: "Bridge",
    0x0700: "Serial controller",
    0x0780: "Communication controller",
    0x0805: "SD Host controller",
    0x0880: "System peripheral",
    0x0C03: "USB controller",
    0x0C05: "SMBus",
    0x0C80: "Serial bus controller",
    0x1080: "Encryption controller",
    0x1101: "Performance counters",
    0x1180: "Signal processing controller",
}

_CLASS = re.compile(r"0x([0-9a-fA-F]{6})")
_ID = re.compile(r"0x([0-9a-fA-F]{4})")
_GROUP = re.compile(r"[0-9]{1,9}")


class Unreadable(Exception):
    """A device whose identity (class, vendor, device) cannot be read: says what is wrong."""


@dataclass(frozen=True)
class PciDevice:
    """What neurond knows of one PCI function."""

    address: str
    class_code: int  # 24 bits: base class, subclass, programming interface
    vendor_id: str  # 4 lowercase hex digits
    device_id: str
    driver: str  # "" when no driver is bound
    iommu_group: int  # -1 when in none (IOMMU off, or the link is unusable)
    boot_vga: bool | None  # None: the attribute exists but cannot be read

    @property
    def slot(self) -> str:
        """DDDD:BB:SS: the functions of one card share it."""
        return self.address[:-2]

    @property
    def is_gpu(self) -> bool:
        return self.class_code >> 8 in GPU_CLASSES


def is_address(name: str) -> bool:
    """Whether a directory entry is a (lowercase, as the kernel writes them) PCI address."""
    return len(name) == 12 and name == name.lower() and bool(PCI_ADDRESS_RE.fullmatch(name))


def class_name(class_code: int | None) -> str:
    if class_code is None:
        return "device of unknown class"
    return CLASS_NAMES.get(class_code >> 8, f"device of class {class_code:06x}")


def _hex_attr(path: Path, pattern: re.Pattern[str]) -> str | None:
    text = files.read_text(path)
    if text is None:
        return None
    m = pattern.fullmatch(text.strip())
    return m[1].lower() if m else None


def read_class(device_dir: Path) -> int | None:
    """The 24-bit class code, None when missing, unreadable or not ``0xXXXXXX``."""
    value = _hex_attr(device_dir / "class", _CLASS)
    return None if value is None else int(value, 16)


def read_group(device_dir: Path) -> int:
    """The IOMMU group number from the ``iommu_group`` link; -1 when there is none."""
    name = files.link_name(device_dir / "iommu_group")
    if name is None or not _GROUP.fullmatch(name):
        return -1
    return int(name)


def read_boot_vga(device_dir: Path) -> bool | None:
    """``boot_vga``: the kernel has it only for VGA-class devices, so absent means no."""
    path = device_dir / "boot_vga"
    text = files.read_text(path)
    if text is None:
        return None if files.exists(path) else False
    value = text.strip()
    if value in ("0", "1"):
        return value == "1"
    return None


def read_device(device_dir: Path, address: str, class_code: int | None = None) -> PciDevice:
    """Read one device (``class_code``: when already read); raises Unreadable saying what is
    missing or malformed."""
    if class_code is None:
        class_code = read_class(device_dir)
    if class_code is None:
        raise Unreadable("its class is missing, unreadable or not a class code")
    vendor = _hex_attr(device_dir / "vendor", _ID)
    device = _hex_attr(device_dir / "device", _ID)
    if vendor is None or device is None:
        raise Unreadable("its vendor or device id is missing, unreadable or malformed")
    return PciDevice(
        address=address,
        class_code=class_code,
        vendor_id=vendor,
        device_id=device,
        driver=files.link_name(device_dir / "driver") or "",
        iommu_group=read_group(device_dir),
        boot_vga=read_boot_vga(device_dir),
    )
