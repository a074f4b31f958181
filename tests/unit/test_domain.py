"""The domain XML model: golden files per profile, one test per spec key, no injection,
libvirt's schema (virt-xml-validate), and the Looking Glass size formula.

Regenerate the golden files with ``NEUROND_REGEN_GOLDEN=1 pytest tests/unit/test_domain.py``
and review the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from neurond.domain.build import Firmware, HostFacts, VMFiles, to_xml
from neurond.domain.parse import summarize
from neurond.domain.spec import KEY_TYPES, PROFILES, VMSpec, looking_glass_mib, parse_spec, resolve
from neurond.errors import InvalidArgumentError

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UUID = "6f1c2d3e-4a5b-4c6d-8e7f-001122334455"
SECURE = Firmware(
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd", True
)
PLAIN = Firmware("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd", False)
REGEN = os.environ.get("NEUROND_REGEN_GOLDEN") == "1"


def xml_for(host: HostFacts | None = None, hostdevs: tuple[str, ...] = (), **spec: Any) -> str:
    spec.setdefault("name", "vm1")
    s = resolve(parse_spec(spec))
    if host is None:
        fw = (SECURE if s.secure_boot else PLAIN) if s.uefi else None
        host = HostFacts(domain_type="qemu", firmware=fw)
    files = VMFiles(
        uuid=UUID,
        disk=f"/var/lib/neurond/images/{s.name}-{UUID}.qcow2",
        nvram=f"/var/lib/neurond/images/{s.name}-{UUID}_VARS.fd" if s.uefi else "",
        hostdevs=hostdevs,
    )
    return to_xml(s, host, files)


def validate_schema(xml: str, tmp_path: Path) -> None:
    if shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None:
        pytest.skip("virt-xml-validate/xmllint (libvirt-clients, libxml2-utils) not installed")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    out = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_golden_file_per_profile(profile: str, tmp_path: Path) -> None:
    xml = xml_for(name=f"golden-{profile}", profile=profile, iso="/var/lib/neurond/images/os.iso")
    golden = GOLDEN / f"{profile}.xml"
    if REGEN:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(xml)
    assert golden.read_text() == xml, f"regenerate with NEUROND_REGEN_GOLDEN=1 and review {golden}"
    validate_schema(xml, tmp_path)


def test_everything_at_once_validates(tmp_path: Path) -> None:
    host = HostFacts("kvm", "default", SECURE, "/usr/share/virtio-win/virtio-win.iso")
    xml = xml_for(
        host, ("0000:03:00.0", "0000:03:00.1"), profile="windows11", iso="/i/win.iso",
        gpu="0000:03:00.0", looking_glass=True, looking_glass_resolution="3840x2160",
        kernel="/k/vmlinuz", initrd="/k/initrd", cmdline="console=ttyS0 quiet",
    )  # fmt: skip
    validate_schema(xml, tmp_path)


def find(xml: str, path: str) -> list[ET.Element]:
    return ET.fromstring(xml).findall(path)


# One test per spec key: setting it changes the XML the way API.md says.


def test_key_name() -> None:
    assert ET.fromstring(xml_for(name="other")).findtext("name") == "other"


def test_key_profile() -> None:
    windows = xml_for(profile="windows10")
    assert find(windows, "./features/hyperv") and not find(xml_for(), "./features/hyperv")
    assert find(windows, "./clock")[0].get("offset") == "localtime"


def test_key_vcpus() -> None:
    xml = xml_for(vcpus=6)
    assert summarize(xml).vcpus == 6
    assert find(xml, "./cpu/topology")[0].get("cores") == "6"


def test_key_memory_mib() -> None:
    xml = xml_for(memory_mib=3072)
    assert summarize(xml).memory_mib == 3072
    assert find(xml, "./currentMemory")[0].text == "3072"


def test_key_disk_gib() -> None:
    # The size is the volume's (made through libvirt's pool API); the XML names the volume.
    s = resolve(parse_spec({"name": "a", "disk_gib": 33}))
    assert s.disk_gib == 33
    assert find(xml_for(), "./devices/disk[@device='disk']/driver")[0].get("type") == "qcow2"


def test_key_iso() -> None:
    xml = xml_for(iso="/isos/x.iso")
    (cdrom,) = find(xml, "./devices/disk[@device='cdrom']")
    assert cdrom.find("source").get("file") == "/isos/x.iso"  # type: ignore[union-attr]
    assert cdrom.find("readonly") is not None
    assert [b.get("dev") for b in find(xml, "./os/boot")] == ["cdrom", "hd"]
    assert not find(xml_for(), "./devices/disk[@device='cdrom']")


def test_virtio_win_only_for_windows() -> None:
    host = HostFacts("qemu", firmware=SECURE, virtio_win="/vw/virtio-win.iso")
    assert len(find(xml_for(host, profile="windows11"), "./devices/disk[@device='cdrom']")) == 1
    assert not find(xml_for(host, profile="linux"), "./devices/disk[@device='cdrom']")


def test_key_gpu() -> None:
    xml = xml_for(hostdevs=("0000:03:00.0", "0000:03:00.1"), gpu="0000:03:00.0")
    assert summarize(xml).gpu_address == "0000:03:00.0"
    functions = [h.find("./source/address").get("function") for h in find(xml, "./devices/hostdev")]  # type: ignore[union-attr]
    assert functions == ["0x0", "0x1"]
    assert find(xml, "./devices/memballoon")[0].get("model") == "none"


def test_key_looking_glass_and_resolution() -> None:
    xml = xml_for(looking_glass=True)
    (shmem,) = find(xml, "./devices/shmem")
    assert shmem.get("name") == f"looking-glass-{UUID}"
    assert shmem.find("model").get("type") == "ivshmem-plain"  # type: ignore[union-attr]
    assert shmem.findtext("size") == "32"
    assert summarize(xml).looking_glass
    big = xml_for(looking_glass=True, looking_glass_resolution="3840x2160")
    assert find(big, "./devices/shmem/size")[0].text == "128"
    assert not find(xml_for(), "./devices/shmem")


@pytest.mark.parametrize(
    ("w", "h", "mib"),
    [(1920, 1080, 32), (2560, 1440, 64), (3440, 1440, 64), (3840, 2160, 128), (640, 480, 32),
     (7680, 4320, 512), (1, 1, 32)],
)  # fmt: skip
def test_looking_glass_formula(w: int, h: int, mib: int) -> None:
    assert looking_glass_mib(w, h) == mib


def test_key_uefi() -> None:
    xml = xml_for(uefi=True)
    assert find(xml, "./os/loader")[0].text == PLAIN.code
    assert find(xml, "./os/loader")[0].get("secure") == "no"
    assert find(xml, "./os/nvram")[0].get("template") == PLAIN.vars_template
    assert not find(xml_for(), "./os/loader")


def test_key_secure_boot() -> None:
    xml = xml_for(uefi=True, secure_boot=True)
    assert find(xml, "./os/loader")[0].get("secure") == "yes"
    assert find(xml, "./features/smm")[0].get("state") == "on"
    off = xml_for(profile="windows10", secure_boot=False)
    assert not find(off, "./features/smm")


def test_key_tpm() -> None:
    (tpm,) = find(xml_for(tpm=True), "./devices/tpm")
    assert tpm.get("model") == "tpm-crb"
    assert tpm.find("backend").attrib == {"type": "emulator", "version": "2.0"}  # type: ignore[union-attr]
    assert not find(xml_for(), "./devices/tpm")
    assert not find(xml_for(profile="windows10", tpm=False), "./devices/tpm")


def test_key_autostart() -> None:
    # Autostart is libvirt's flag, set by the create's last step, not part of the XML.
    assert resolve(parse_spec({"name": "a", "autostart": True})).autostart
    assert xml_for(autostart=True) == xml_for(autostart=False)


def test_keys_kernel_initrd_cmdline() -> None:
    xml = xml_for(kernel="/k/vmlinuz", initrd="/k/initrd.img", cmdline="console=ttyS0")
    os_ = find(xml, "./os")[0]
    assert (os_.findtext("kernel"), os_.findtext("initrd"), os_.findtext("cmdline")) == (
        "/k/vmlinuz", "/k/initrd.img", "console=ttyS0"
    )  # fmt: skip
    assert not os_.findall("boot")


def test_domain_type_and_cpu() -> None:
    kvm = xml_for(HostFacts("kvm"))
    assert ET.fromstring(kvm).get("type") == "kvm"
    assert find(kvm, "./cpu")[0].get("mode") == "host-passthrough"
    tcg = xml_for(HostFacts("qemu"))
    assert find(tcg, "./cpu")[0].get("mode") == "maximum"  # QEMU's -cpu max


def test_network() -> None:
    assert (
        find(xml_for(HostFacts("qemu", network="br-lan")), "./devices/interface/source")[0].get(
            "network"
        )
        == "br-lan"
    )
    assert find(xml_for(), "./devices/interface")[0].get("type") == "user"


def test_every_key_has_a_test() -> None:
    tested = {name.removeprefix("test_key_") for name in globals() if name.startswith("test_key")}
    covered = set()
    for t in tested:
        covered.update(k for k in KEY_TYPES if k in t)
    covered.update({"kernel", "initrd", "cmdline", "looking_glass_resolution"})
    assert covered == set(KEY_TYPES) == set(VMSpec.model_fields)


def test_values_cannot_inject_xml() -> None:
    evil = "console=ttyS0 '\"/><devices><hostdev/></devices><x a='"
    xml = xml_for(kernel="/k/a'b\"<c>&", cmdline=evil)
    root = ET.fromstring(xml)
    assert root.findtext("./os/cmdline") == evil
    assert root.findtext("./os/kernel") == "/k/a'b\"<c>&"
    assert not root.findall(".//hostdev") and not root.findall(".//x")


@pytest.mark.parametrize(
    "values",
    [{"name": "a", "uefi": False, "secure_boot": True}, {"name": "a", "initrd": "/x"},
     {"name": "a", "profile": "windows11", "uefi": False}, {"name": "a", "vcpus": 0}],
)  # fmt: skip
def test_inconsistent_specs(values: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        resolve(parse_spec(values))


def test_profile_defaults() -> None:
    w11 = resolve(parse_spec({"name": "a", "profile": "windows11"}))
    assert (w11.vcpus, w11.memory_mib, w11.disk_gib) == (4, 8192, 64)
    assert (w11.uefi, w11.secure_boot, w11.tpm) == (True, True, True)
    generic = resolve(parse_spec({"name": "a"}))
    assert generic.profile.name == "generic" and not generic.uefi


def test_owner_and_profile_round_trip_through_the_metadata() -> None:
    s = resolve(parse_spec({"name": "vm1", "profile": "windows10"}))
    xml = to_xml(s, HostFacts(domain_type="qemu", firmware=PLAIN), VMFiles(uuid=UUID), owner=1000)
    summary = summarize(xml)
    assert (summary.owner, summary.profile) == (1000, "windows10")
    # Not a uid (hand-edited, or no metadata at all): no owner.
    for bad in ("-1", "x", "", "4294967296", "1e3"):
        assert summarize(xml.replace('owner="1000"', f'owner="{bad}"')).owner == 0
    assert summarize("<domain><name>a</name></domain>").owner == 0


def test_memory_below_the_profile_minimum_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="windows11 profile needs at least 4096 MiB"):
        resolve(parse_spec({"name": "vm1", "profile": "windows11", "memory_mib": 4095}))
    assert resolve(parse_spec({"name": "vm1", "profile": "windows11", "memory_mib": 4096}))
