"""Whether the IOMMU is on, what the CPU offers, and what to change when it is off.

The IOMMU is on when ``/sys/kernel/iommu_groups`` holds groups. The CPU's vendor and its
virtualization flag (``vmx``/``svm``) come from the first processor of ``/proc/cpuinfo``; the
kernel command line tells whether the vendor's parameter is already there (then the firmware
is what keeps the IOMMU off) or whether something turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neurond.hardware import files

CPUINFO_LIMIT = 64 * 1024  # enough for the first processor's block
CMDLINE_LIMIT = 64 * 1024

# /proc/cpuinfo vendor_id → (cpu_vendor, kernel parameter, what the firmware setup calls it).
# Hygon's Zen-based CPUs use the AMD IOMMU driver; API.md has no name for them.
_VENDORS = {
    "GenuineIntel": ("intel", "intel_iommu=on", "VT-d"),
    "AuthenticAMD": ("amd", "amd_iommu=on", "the IOMMU (AMD-Vi)"),
    "HygonGenuine": ("other", "amd_iommu=on", "the IOMMU (AMD-Vi)"),
}


@dataclass(frozen=True)
class IOMMUStatus:
    """API.md's GetIOMMUStatus, plus what the kernel command line says for the words."""

    enabled: bool
    groups: int
    cpu_vendor: str  # intel, amd or other
    virtualization: bool
    kernel_param: str  # the parameter to add when off, "" when on
    firmware_feature: str  # what to enable in the firmware setup ("" when unknown)
    param_present: bool  # kernel_param (or the vendor's on-switch) is already on the command line
    disabled_by: str  # a command-line token that turns the IOMMU off ("" none)

    def off_reason(self) -> str:
        """A sentence saying why the IOMMU is off and what to do; "" when it is on."""
        if self.enabled:
            return ""
        param = self.kernel_param
        firmware = self.firmware_feature or "the IOMMU"
        if self.disabled_by:
            add = f" (and add {param})" if param else ""
            return (
                f"The IOMMU is off because the kernel command line has {self.disabled_by}: "
                f"remove it{add} and reboot."
            )
        if not param:
            return (
                f"The IOMMU is off: enable {firmware} in the firmware (BIOS/UEFI) setup and "
                "reboot; neurond knows no kernel parameter for this CPU."
            )
        if self.param_present:
            return (
                f"The IOMMU is off although the kernel command line has {param}: enable "
                f"{firmware} in the firmware (BIOS/UEFI) setup and reboot."
            )
        return (
            f"The IOMMU is off: enable {firmware} in the firmware (BIOS/UEFI) setup, add "
            f"{param} to the kernel command line, and reboot."
        )


def count_groups(sysfs_root: Path) -> int:
    names = files.list_dir(sysfs_root / "kernel" / "iommu_groups")
    return sum(1 for name in names if name.isascii() and name.isdigit())


def read_cpu(procfs_root: Path) -> tuple[str, bool]:
    """(vendor_id, has vmx or svm) of the first processor; ("", False) when unreadable."""
    text = files.read_text(procfs_root / "cpuinfo", CPUINFO_LIMIT) or ""
    vendor = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            if vendor or flags:
                break  # the end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return vendor, bool(flags & {"vmx", "svm"})


def kernel_args(procfs_root: Path) -> list[str]:
    """The kernel's own arguments (those after ``--`` belong to init)."""
    text = files.read_text(procfs_root / "cmdline", CMDLINE_LIMIT) or ""
    args = text.split()
    return args[: args.index("--")] if "--" in args else args


def _values(args: list[str], key: str) -> list[str]:
    """Every comma-separated value given to ``key=`` (e.g. intel_iommu=on,igfx_off)."""
    out: list[str] = []
    for arg in args:
        name, sep, value = arg.partition("=")
        if sep and name == key:
            out.extend(value.split(","))
    return out


def read_status(sysfs_root: Path, procfs_root: Path) -> IOMMUStatus:
    groups = count_groups(sysfs_root)
    vendor_id, virtualization = read_cpu(procfs_root)
    cpu_vendor, param, firmware = _VENDORS.get(vendor_id, ("other", "", ""))
    args = kernel_args(procfs_root)
    driver_key = param.partition("=")[0]  # intel_iommu / amd_iommu
    present = bool(driver_key) and "on" in _values(args, driver_key)
    disabled_by = ""
    for key in filter(None, (driver_key, "iommu")):
        if "off" in _values(args, key):
            disabled_by = f"{key}=off"
    enabled = groups > 0
    return IOMMUStatus(
        enabled=enabled,
        groups=groups,
        cpu_vendor=cpu_vendor,
        virtualization=virtualization,
        kernel_param="" if enabled else param,
        firmware_feature=firmware,
        param_present=present,
        disabled_by="" if enabled else disabled_by,
    )
