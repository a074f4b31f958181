"""The CD-ROM edits of a domain's XML and the files a domain refers to (neurond.domain.media)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from dbus_fast import Message

from neurond.bus.router import Call
from neurond.bus.service import BusService
from neurond.core.backend import DomainInfo
from neurond.core.states import VMState
from neurond.core.vm import VM
from neurond.domain import media
from neurond.errors import InvalidStateError, NotSupportedError, OperationFailedError

DOMAIN = """<domain type='kvm'><name>win11</name>
  <os><type>hvm</type><loader readonly='yes'>/usr/share/OVMF/CODE.fd</loader>
    <nvram>/var/lib/neurond/images/win11_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><source file='/img/win11.qcow2'/><target dev='vda'/></disk>
    <disk type='block' device='cdrom'><driver name='qemu' type='raw'/>
      <source dev='/dev/sr0' index='2'/><backingStore/><target dev='sda' bus='sata' tray='open'/>
      <readonly/>
      <alias name='sata0-0-0'/></disk>
    <disk type='file' device='cdrom'><source file='/isos/virtio-win.iso'/>
      <target dev='sdb' bus='sata'/><readonly/></disk>
  </devices></domain>"""
NO_CDROM = "<domain><name>plain</name><devices/></domain>"


def test_the_first_cdrom_gets_a_file() -> None:
    disk = ET.fromstring(media.media_device(DOMAIN, "/isos/new.iso", "win11"))
    assert disk.get("type") == "file" and disk.get("device") == "cdrom"
    assert [s.attrib for s in disk.findall("source")] == [{"file": "/isos/new.iso"}]
    assert disk.find("backingStore") is None
    assert [c.tag for c in disk][:2] == ["driver", "source"]
    target = disk.find("target")
    assert target is not None and target.get("dev") == "sda"  # libvirt matches by target
    assert target.get("tray") is None


def test_eject_leaves_no_source_and_the_other_drive_alone() -> None:
    xml = media.with_media(DOMAIN, None, "win11")
    assert media.media(xml) == ""
    cdroms = ET.fromstring(xml).findall("./devices/disk[@device='cdrom']")
    second = cdroms[1].find("source")
    assert second is not None and second.get("file") == "/isos/virtio-win.iso"
    assert media.media(media.with_media(xml, "/isos/a.iso", "win11")) == "/isos/a.iso"


def test_files_are_every_source_and_boot_file() -> None:
    assert media.files(DOMAIN) == {
        "/img/win11.qcow2", "/dev/sr0", "/isos/virtio-win.iso",
        "/usr/share/OVMF/CODE.fd", "/var/lib/neurond/images/win11_VARS.fd",
    }  # fmt: skip
    assert media.files(NO_CDROM) == frozenset()


@pytest.mark.parametrize("path", ["/isos/a.iso", None])
def test_no_cdrom_is_not_supported(path: str | None) -> None:
    for edit in (media.media_device, media.with_media):
        with pytest.raises(NotSupportedError, match="'plain' has no CD-ROM drive"):
            edit(NO_CDROM, path, "plain")
    assert media.media(NO_CDROM) == ""


def test_unreadable_xml_is_operation_failed() -> None:
    with pytest.raises(OperationFailedError):
        media.files("<domain>")


class _StartsDuringAuthorization:
    """An authorizer during whose answer the VM changes state (as when polkit shows a dialog
    and the VM starts meanwhile): the race cannot be timed reliably over the bus."""

    def __init__(self, vm: VM, becomes: VMState) -> None:
        self.vm, self.becomes, self.asked = vm, becomes, []

    async def authorize(self, sender: str, action: str, *details: object) -> int:
        self.asked.append(action)
        self.vm.state = self.becomes
        return 0


@pytest.mark.parametrize(
    ("before", "after", "action"),
    [
        (VMState.SHUTOFF, VMState.RUNNING, "vm-manage"),
        (VMState.RUNNING, VMState.SHUTOFF, "vm-lifecycle"),
    ],
)
async def test_a_state_change_during_authorization_is_invalid_state(
    before: VMState, after: VMState, action: str
) -> None:
    vm = VM(
        DomainInfo("6695eb01-f6a4-8304-79aa-97f2502e193f", "w", before, "", True, False, 1, 256)
    )
    service = BusService.__new__(BusService)  # only its authorization step runs here
    service.auth = auth = _StartsDuringAuthorization(vm, after)
    call = Call(Message(path="/x", member="EjectMedia", sender=":1.5"), "/x")
    with pytest.raises(InvalidStateError, match=f"became {after} during the authorization"):
        await service._authorize_media(vm, call, "EjectMedia")
    assert auth.asked == [action]  # asked for the action of the state before
