"""CD-ROM media and the files domains use, on libvirt (blocking: run in the backend's executor).

An active VM changes live and persistently in one ``virDomainUpdateDeviceFlags`` (QEMU opens
the tray, swaps the medium and closes it). An inactive VM is defined again with the new medium:
the same persistent change as ``updateDeviceFlags(AFFECT_CONFIG)``, and one that every driver
takes (libvirt's test driver has no updateDeviceFlags).
"""

from __future__ import annotations

import libvirt

from neurond.domain import media


def change(dom: libvirt.virDomain, path: str | None) -> None:
    """Insert ``path`` into the domain's first CD-ROM (None: eject); NotSupportedError when it
    has none; libvirtError as libvirt raised it."""
    name = dom.name()
    if dom.isActive():
        device = media.media_device(dom.XMLDesc(0), path, name)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        dom.updateDeviceFlags(device, flags)
        return
    # SECURE: a definition written back must keep its display passwords.
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    dom.connect().defineXML(media.with_media(xml, path, name))


def domain_files(conn: libvirt.virConnect) -> dict[str, frozenset[str]]:
    """Per domain UUID, the host files its live and persistent definitions refer to."""
    out: dict[str, frozenset[str]] = {}
    for dom in conn.listAllDomains(0):
        try:
            found = media.files(dom.XMLDesc(0))
            if dom.isActive() and dom.isPersistent():
                found |= media.files(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            out[dom.UUIDString().lower()] = found
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise  # a domain undefined while we look is simply gone
    return out
