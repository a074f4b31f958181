"""The CD-ROM of a domain's XML (ChangeMedia, EjectMedia) and the host files a domain uses.

"The VM's CD-ROM" is the first ``<disk device='cdrom'>`` in document order: neurond creates
the install ISO's drive first (sda) and the virtio-win drive after it.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

from neurond.errors import NotSupportedError, OperationFailedError


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise OperationFailedError(f"libvirt returned domain XML neurond cannot read: {e}.") from e


def _cdrom(root: ET.Element, vm: str) -> ET.Element:
    cdrom = root.find("./devices/disk[@device='cdrom']")
    if cdrom is None:
        raise NotSupportedError(
            f"VM {vm!r} has no CD-ROM drive, so it has no media to change; a drive is added "
            "when the VM is created with an ISO.",
            details={"vm": vm},
        )
    return cdrom


def _set_source(disk: ET.Element, path: str | None) -> None:
    """The drive with ``path`` inserted (a file), or empty when ``path`` is None."""
    for old in disk.findall("source") + disk.findall("backingStore"):
        disk.remove(old)
    disk.set("type", "file")  # a host drive (type='block') becomes a file drive
    target = disk.find("target")
    if target is not None:
        target.attrib.pop("tray", None)  # a tray the guest opened closes over the new medium
    if path is not None:
        source = ET.Element("source", file=path)
        driver = disk.find("driver")
        disk.insert(0 if driver is None else list(disk).index(driver) + 1, source)


def current(root: ET.Element) -> str:
    """The file in the first CD-ROM drive of a parsed domain; "" when empty or without one."""
    cdrom = root.find("./devices/disk[@device='cdrom']")
    source = None if cdrom is None else cdrom.find("source")
    return "" if source is None else source.get("file", source.get("dev", ""))


def media(xml: str) -> str:
    """The file in the first CD-ROM drive; "" when it is empty or there is no drive."""
    return current(_parse(xml))


def media_device(xml: str, path: str | None, vm: str) -> str:
    """The first CD-ROM's ``<disk>`` element with new media, for virDomainUpdateDeviceFlags;
    NotSupportedError when the domain has no CD-ROM drive."""
    disk = copy.deepcopy(_cdrom(_parse(xml), vm))
    disk.tail = None
    _set_source(disk, path)
    return ET.tostring(disk, encoding="unicode")


def with_media(xml: str, path: str | None, vm: str) -> str:
    """The whole domain with new media in its first CD-ROM (a persistent definition to
    define again); NotSupportedError when the domain has no CD-ROM drive."""
    root = _parse(xml)
    _set_source(_cdrom(root, vm), path)
    return ET.tostring(root, encoding="unicode")


def files(xml: str) -> frozenset[str]:
    """Every host file the domain refers to: disk and CD-ROM sources, firmware, NVRAM,
    kernel and initrd."""
    root = _parse(xml)
    out = set()
    for source in root.iterfind("./devices/disk/source"):
        for attr in ("file", "dev"):
            if source.get(attr):
                out.add(source.get(attr, ""))
    for tag in ("loader", "nvram", "kernel", "initrd"):
        text = (root.findtext(f"./os/{tag}") or "").strip()
        if text:
            out.add(text)
    return frozenset(out)
