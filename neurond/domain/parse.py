"""Reading back what libvirt returns: the facts of a domain's XML the VM object shows."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from neurond.domain import media
from neurond.errors import OperationFailedError

_UNITS = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 10**6,
    "m": 2**20,
    "mib": 2**20,
    "gb": 10**9,
    "g": 2**30,
    "gib": 2**30,
    "tb": 10**12,
    "t": 2**40,
    "tib": 2**40,
}
AGENT_CHANNEL = "org.qemu.guest_agent.0"
METADATA_NS = "https://neuronos.org/xmlns/neurond/1"
MAX_UID = 2**32 - 1


@dataclass(frozen=True, slots=True)
class DomainSummary:
    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    gpu_address: str
    looking_glass: bool
    guest_agent: str  # connected | disconnected | none
    owner: int = 0  # neurond's metadata: the creator's uid; 0 without (defined elsewhere)
    profile: str = ""  # neurond's metadata: the profile it was created with
    media: str = ""  # the file in the first CD-ROM drive (ChangeMedia), "" if none


def _memory_mib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    unit = el.get("unit", "KiB").lower()
    return int(el.text or "0") * _UNITS.get(unit, 1024) // 2**20


def _pci_address(addr: ET.Element) -> str:
    def part(key: str) -> int:
        return int(addr.get(key, "0"), 0)

    return f"{part('domain'):04x}:{part('bus'):02x}:{part('slot'):02x}.{part('function'):x}"


def _owner(meta: ET.Element | None) -> int:
    """The owner attribute; anything but a uid (absent, edited by hand) counts as no owner."""
    text = meta.get("owner", "") if meta is not None else ""
    return int(text) if text.isdecimal() and int(text) <= MAX_UID else 0


def summarize(xml: str) -> DomainSummary:
    """The VM properties held in a domain's XML; malformed XML is OperationFailedError."""
    try:
        root = ET.fromstring(xml)
        gpu = ""
        for hostdev in root.iterfind("./devices/hostdev[@type='pci']"):
            addr = hostdev.find("./source/address")
            if addr is not None:
                gpu = _pci_address(addr)
                break
        agent = "none"
        for target in root.iterfind("./devices/channel/target"):
            if target.get("name") == AGENT_CHANNEL:
                agent = "connected" if target.get("state") == "connected" else "disconnected"
        looking_glass = any(
            (shmem.get("name") or "").startswith("looking-glass")
            for shmem in root.iterfind("./devices/shmem")
        )
        meta = root.find(f"./metadata/{{{METADATA_NS}}}vm")
        return DomainSummary(
            name=root.findtext("name", ""),
            uuid=root.findtext("uuid", "").lower(),
            vcpus=int(root.findtext("vcpu", "0") or 0),
            memory_mib=_memory_mib(root.find("memory")),
            gpu_address=gpu,
            looking_glass=looking_glass,
            guest_agent=agent,
            owner=_owner(meta),
            profile=meta.get("profile", "") if meta is not None else "",
            media=media.current(root),
        )
    except (ET.ParseError, ValueError) as e:
        raise OperationFailedError(f"libvirt returned domain XML neurond cannot read: {e}.") from e
