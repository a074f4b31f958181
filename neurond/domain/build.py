"""A new VM's libvirt domain XML, built with ElementTree from resolved settings.

Every caller-given value ends up as element text or an attribute value that ElementTree
escapes, so no value can add or change XML structure. The builder is pure: host facts
(firmware paths, domain type, network) and the paths of the VM's own files come in as data,
which keeps it testable against golden files.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from neurond.domain.parse import AGENT_CHANNEL, METADATA_NS
from neurond.domain.spec import Settings, looking_glass_mib

SPICE_CHANNEL = "com.redhat.spice.0"
HYPERV = ("relaxed", "vapic", "vpindex", "runtime", "synic", "stimer", "reset", "frequencies")


@dataclass(frozen=True)
class Firmware:
    """An OVMF build: read-only code and the template its per-VM NVRAM is copied from."""

    code: str
    vars_template: str
    secure: bool


@dataclass(frozen=True)
class HostFacts:
    """What the host gives a new VM (from the configuration and the installed packages)."""

    domain_type: str  # kvm | qemu
    network: str = ""  # a libvirt network; "" = user-mode networking
    firmware: Firmware | None = None  # needed when the VM uses UEFI
    virtio_win: str = ""  # the virtio-win driver ISO, attached to Windows VMs when present


@dataclass(frozen=True)
class VMFiles:
    """The VM's own files, named by the create transaction."""

    uuid: str
    disk: str = ""
    nvram: str = ""
    hostdevs: tuple[str, ...] = field(default=())  # PCI addresses: the GPU and its functions

    @property
    def shm_name(self) -> str:
        return f"looking-glass-{self.uuid}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _pci(parent: ET.Element, address: str) -> None:
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    _sub(
        parent,
        "address",
        domain=f"0x{domain}",
        bus=f"0x{bus}",
        slot=f"0x{slot}",
        function=f"0x{function}",
    )


def _os(dom: ET.Element, s: Settings, host: HostFacts, files: VMFiles) -> None:
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    if s.uefi:
        assert host.firmware is not None, "UEFI needs firmware (checked before building)"
        fw = host.firmware
        _sub(
            os_,
            "loader",
            fw.code,
            readonly="yes",
            secure="yes" if fw.secure else "no",
            type="pflash",
        )
        _sub(os_, "nvram", files.nvram, template=fw.vars_template)
    if s.kernel:
        _sub(os_, "kernel", s.kernel)
        if s.initrd:
            _sub(os_, "initrd", s.initrd)
        if s.cmdline:
            _sub(os_, "cmdline", s.cmdline)
        return
    if s.iso:
        _sub(os_, "boot", dev="cdrom")
    _sub(os_, "boot", dev="hd")


def _features(dom: ET.Element, s: Settings) -> None:
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if s.profile.windows:
        hyperv = _sub(features, "hyperv", mode="custom")
        for name in HYPERV[:2]:
            _sub(hyperv, name, state="on")
        _sub(hyperv, "spinlocks", state="on", retries="8191")
        for name in HYPERV[2:]:
            _sub(hyperv, name, state="on")
    if s.secure_boot:
        _sub(features, "smm", state="on")  # secure-boot OVMF needs SMM


def _cpu(dom: ET.Element, s: Settings, host: HostFacts) -> None:
    if host.domain_type == "kvm":
        cpu = _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    else:
        # Software emulation: libvirt's "maximum" mode is QEMU's "-cpu max", every feature TCG
        # has ("custom" with model "max" is refused at start: max is not in libvirt's CPU map).
        cpu = _sub(dom, "cpu", mode="maximum", check="none")
    _sub(cpu, "topology", sockets="1", dies="1", cores=str(s.vcpus), threads="1")


def _clock(dom: ET.Element, s: Settings) -> None:
    clock = _sub(dom, "clock", offset="localtime" if s.profile.windows else "utc")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="no")
    if s.profile.windows:
        _sub(clock, "timer", name="hypervclock", present="yes")


def _cdrom(devices: ET.Element, path: str, target: str) -> None:
    disk = _sub(devices, "disk", type="file", device="cdrom")
    _sub(disk, "driver", name="qemu", type="raw")
    _sub(disk, "source", file=path)
    _sub(disk, "target", dev=target, bus="sata")
    _sub(disk, "readonly")


def _devices(dom: ET.Element, s: Settings, host: HostFacts, files: VMFiles) -> None:
    devices = _sub(dom, "devices")
    if files.disk:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
        _sub(disk, "source", file=files.disk)
        _sub(disk, "target", dev="vda", bus="virtio")
    cdroms = [p for p in (s.iso, host.virtio_win if s.profile.windows else "") if p]
    for i, path in enumerate(cdroms):
        _cdrom(devices, path, f"sd{'abcdefgh'[i]}")
    _sub(devices, "controller", type="usb", model="qemu-xhci")
    if host.network:
        nic = _sub(devices, "interface", type="network")
        _sub(nic, "source", network=host.network)
    else:
        nic = _sub(devices, "interface", type="user")
    _sub(nic, "model", type="virtio")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    agent = _sub(devices, "channel", type="unix")
    _sub(agent, "target", type="virtio", name=AGENT_CHANNEL)
    spice_channel = _sub(devices, "channel", type="spicevmc")
    _sub(spice_channel, "target", type="virtio", name=SPICE_CHANNEL)
    _sub(devices, "input", type="tablet", bus="usb")
    graphics = _sub(devices, "graphics", type="spice", autoport="yes")
    _sub(graphics, "listen", type="address", address="127.0.0.1")
    _sub(graphics, "image", compression="off")
    video = _sub(devices, "video")
    _sub(video, "model", type="qxl" if s.profile.windows else "virtio", heads="1", primary="yes")
    if s.tpm:
        tpm = _sub(devices, "tpm", model="tpm-crb")
        _sub(tpm, "backend", type="emulator", version="2.0")
    for address in files.hostdevs:
        hostdev = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
        _pci(_sub(hostdev, "source"), address)
    if s.looking_glass:
        shmem = _sub(devices, "shmem", name=files.shm_name)
        _sub(shmem, "model", type="ivshmem-plain")
        _sub(shmem, "size", str(looking_glass_mib(*s.resolution)), unit="M")
    # Looking Glass and passed-through GPUs want all guest memory present: no balloon then.
    _sub(devices, "memballoon", model="none" if s.looking_glass or files.hostdevs else "virtio")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")


def build(s: Settings, host: HostFacts, files: VMFiles, owner: int = 0) -> ET.Element:
    """The domain; ``owner`` is the creating uid, kept in neurond's metadata (``Owner``)."""
    dom = ET.Element("domain", type=host.domain_type)
    _sub(dom, "name", s.name)
    _sub(dom, "uuid", files.uuid)
    metadata = _sub(dom, "metadata")
    ET.SubElement(metadata, f"{{{METADATA_NS}}}vm", profile=s.profile.name, owner=str(owner))
    _sub(dom, "memory", str(s.memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(s.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(s.vcpus), placement="static")
    _os(dom, s, host, files)
    _features(dom, s)
    _cpu(dom, s, host)
    _clock(dom, s)
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    pm = _sub(dom, "pm")
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")
    _devices(dom, s, host, files)
    return dom


def to_xml(s: Settings, host: HostFacts, files: VMFiles, owner: int = 0) -> str:
    ET.register_namespace("neurond", METADATA_NS)
    root = build(s, host, files, owner)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"
