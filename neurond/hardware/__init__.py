"""The host's GPUs and IOMMU as sysfs and procfs show them: an adapter beside ``virt/``.

It only reads files under the configured roots (``hardware.sysfs_root``,
``hardware.procfs_root``) and the pci.ids database; it runs no program and writes nothing.
Paths are built from validated PCI addresses and from names read out of directory listings,
never from what a caller typed. A malformed tree gives an honest, partial answer, never an
exception.
"""

from neurond.hardware.iommu import IOMMUStatus
from neurond.hardware.reader import GPU, HardwareReader
from neurond.hardware.readiness import Readiness

__all__ = ["GPU", "HardwareReader", "IOMMUStatus", "Readiness"]
