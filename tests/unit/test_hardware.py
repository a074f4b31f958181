"""neurond.hardware on the fixture trees: IOMMU status, GPUs, readiness in words, pci.ids
names, and malformed or hostile trees that must give an honest answer and never raise.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from neurond import validate
from neurond.errors import GPUNotFoundError, InvalidArgumentError, IOMMUError
from neurond.hardware import HardwareReader, files, iommu, pci, readiness
from neurond.hardware.pciids import PciIds
from tests.fixtures.sysfs import build, expected
from tests.fixtures.sysfs.expected import MACHINES, PCI_IDS, check_sentences, gpu_answer

HOSTILE = ["../../etc", "0000:01:00.0/../..", "", "x" * 1_000_000, "0000:01:00.0\n",
           "0000:01:00.8", "0000:1:00.0", "g000:01:00.0", "0000:01:00.0 ", "0000:01:00.\x00",
           "\uff10000:01:00.0", "/sys/bus/pci/devices/0000:01:00.0", "0000:01:00.0/", "..",
           "0000:01:00.0\x00"]  # fmt: skip


def reader(name: str) -> HardwareReader:
    sys_root, proc = expected.roots(name)
    return HardwareReader(sys_root, proc, PciIds([PCI_IDS]))


def copy_tree(name: str, tmp_path: Path) -> tuple[Path, Path]:
    dest = tmp_path / name
    shutil.copytree(expected.HERE / name, dest, symlinks=True)
    return dest / "sys", dest / "proc"


# ---- validate.pci_address ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [("0000:01:00.0", "0000:01:00.0"), ("0000:0A:1f.7", "0000:0a:1f.7"),
     ("ABCD:EF:01.3", "abcd:ef:01.3")],
)  # fmt: skip
def test_pci_address_accepts_and_lowercases(given: str, normal: str) -> None:
    assert validate.pci_address(given) == normal


@pytest.mark.parametrize("bad", HOSTILE)
def test_pci_address_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        validate.pci_address(bad)
    assert len(e.value.message) < 300
    assert e.value.details == {"argument": "address"}


def test_reader_validates_the_address_itself() -> None:
    """Even a caller that skips validation cannot walk out of bus/pci/devices."""
    for bad in ["../../etc", "0000:01:00.0/../..", "../../../proc/self"]:
        with pytest.raises(InvalidArgumentError):
            reader("laptop-optimus").gpu(bad)


# ---- the fixture trees ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_fixture_answers(name: str) -> None:
    want = MACHINES[name]
    r = reader(name)
    s = r.iommu_status()
    got = {"enabled": s.enabled, "groups": s.groups, "cpu_vendor": s.cpu_vendor,
           "virtualization": s.virtualization, "kernel_param": s.kernel_param}  # fmt: skip
    assert got == want.iommu
    gpus = r.gpus()
    assert [g.address for g in gpus] == [g.address for g in want.gpus]
    for got, exp in zip(gpus, want.gpus, strict=True):
        assert {
            "address": got.address, "vendor_id": got.vendor_id, "device_id": got.device_id,
            "vendor": got.vendor, "name": got.name, "class": got.class_code,
            "driver": got.driver, "iommu_group": got.iommu_group, "boot_vga": got.boot_vga,
            "group_devices": list(got.group_devices), "passthrough_ready": got.readiness.ready,
        } == gpu_answer(exp)  # fmt: skip
        check_sentences(list(got.readiness.reasons), exp.reasons, f"{exp.address} reasons")
        check_sentences(list(got.readiness.warnings), exp.warnings, f"{exp.address} warnings")
        assert r.check(exp.address) == got.readiness
    assert r.any_ready() == bool(want.features)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_every_sentence_is_one_plain_sentence(name: str) -> None:
    for g in reader(name).gpus():
        for text in (*g.readiness.reasons, *g.readiness.warnings):
            assert text[0].isupper() or text.startswith("neurond"), text
            assert text.endswith("."), text
            assert "\n" not in text and "Traceback" not in text and "sys/" not in text, text


def test_without_pci_ids_names_are_empty(tmp_path: Path) -> None:
    sys_root, proc = expected.roots("laptop-optimus")
    gpus = HardwareReader(sys_root, proc, PciIds([tmp_path / "none"])).gpus()
    assert [(g.vendor, g.name) for g in gpus] == [("", ""), ("", "")]
    assert gpus[1].vendor_id == "10de" and gpus[1].readiness.ready


def test_gpu_not_found() -> None:
    r = reader("laptop-optimus")
    with pytest.raises(GPUNotFoundError, match=r"no PCI device at 0000:09:00\.0"):
        r.check("0000:09:00.0")
    with pytest.raises(GPUNotFoundError, match=r"0000:00:14.0 is a USB controller, not a GPU"):
        r.check("0000:00:14.0")
    with pytest.raises(GPUNotFoundError, match=r"PCI bridge, not a GPU"):
        r.check("0000:00:01.0")
    # Upper case is the same device.
    assert r.check("0000:01:00.0".upper()).ready


@pytest.mark.parametrize("address", expected.MALFORMED_NOT_GPUS)
def test_malformed_devices_are_not_gpus(address: str) -> None:
    r = reader("malformed")
    with pytest.raises(GPUNotFoundError) as e:
        r.check(address)
    assert "Traceback" not in e.value.message and len(e.value.message) < 300


def test_malformed_tree_logs_each_problem_once(caplog: pytest.LogCaptureFixture) -> None:
    r = reader("malformed")
    for _ in range(3):
        r.gpus()
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "neurond.hardware"]
    assert len(messages) == len(set(messages))
    assert any("0000:02:00.0" in m for m in messages)
    assert any("'not-an-address'" in m for m in messages)


def test_missing_roots() -> None:
    r = HardwareReader(Path("/nonexistent/sys"), Path("/nonexistent/proc"), PciIds([]))
    assert r.gpus() == [] and not r.any_ready()
    assert r.iommu_status().enabled is False
    with pytest.raises(GPUNotFoundError):
        r.check("0000:01:00.0")


def test_unreadable_attribute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission bits do not stop root, so EACCES is simulated for the NVIDIA GPU's class."""
    sys_root, proc = copy_tree("laptop-optimus", tmp_path)
    target = os.path.realpath(sys_root / "bus/pci/devices/0000:01:00.0/class")
    real_open = os.open

    def deny(path: object, *args: int, **kw: int) -> int:
        if os.path.realpath(os.fspath(path)) == target:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    r = HardwareReader(sys_root, proc, PciIds([PCI_IDS]))
    assert [g.address for g in r.gpus()] == ["0000:00:02.0"]
    with pytest.raises(GPUNotFoundError, match="cannot be read"):
        r.check("0000:01:00.0")


def test_fifo_and_device_nodes_do_not_block(tmp_path: Path) -> None:
    """A FIFO where an attribute should be would block a plain open() forever."""
    sys_root, proc = copy_tree("laptop-optimus", tmp_path)
    dev = Path(os.path.realpath(sys_root / "bus/pci/devices/0000:01:00.0"))
    (dev / "vendor").unlink()
    os.mkfifo(dev / "vendor")
    (proc / "cpuinfo").unlink()
    os.mkfifo(proc / "cpuinfo")
    (dev / "device").unlink()
    os.symlink("/dev/zero", dev / "device")
    result: list[object] = []
    worker = threading.Thread(
        target=lambda: result.append(HardwareReader(sys_root, proc, PciIds([])).gpus()),
        daemon=True,
    )
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert [g.address for g in result[0]] == ["0000:00:02.0"]  # type: ignore[attr-defined]


def test_attribute_symlinks_are_not_followed(tmp_path: Path) -> None:
    sys_root, proc = copy_tree("laptop-optimus", tmp_path)
    dev = Path(os.path.realpath(sys_root / "bus/pci/devices/0000:01:00.0"))
    (tmp_path / "elsewhere").write_text("0x030000\n")
    (dev / "class").unlink()
    os.symlink(tmp_path / "elsewhere", dev / "class")
    assert files.read_text(dev / "class") is None
    assert [g.address for g in HardwareReader(sys_root, proc).gpus()] == ["0000:00:02.0"]


def test_changes_are_seen_on_the_next_call(tmp_path: Path) -> None:
    """No cache: a rebound driver, a removed device, a new root show at once."""
    sys_root, proc = copy_tree("laptop-optimus", tmp_path)
    r = HardwareReader(sys_root, proc, PciIds([PCI_IDS]))
    assert r.any_ready()
    dev = Path(os.path.realpath(sys_root / "bus/pci/devices/0000:01:00.0"))
    (dev / "driver").unlink()
    os.symlink("../../../../bus/pci/drivers/vfio-pci", dev / "driver")
    gpu = r.gpu("0000:01:00.0")
    assert gpu.driver == "vfio-pci" and gpu.readiness.warnings == ()
    (sys_root / "bus/pci/devices/0000:01:00.0").unlink()  # hot-unplugged
    assert not r.any_ready()
    with pytest.raises(GPUNotFoundError):
        r.check("0000:01:00.0")
    r.configure(*expected.roots("desktop-navi10"))
    assert [g.address for g in r.gpus()] == ["0000:03:00.0", "0000:30:00.0"]


# ---- IOMMU and the kernel command line -----------------------------------------------------


def write_proc(proc: Path, vendor: str, cmdline: str, flags: str = "fpu vmx sse") -> None:
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cpuinfo").write_text(
        f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\nvendor_id\t: SomethingElse\nflags\t\t: svm\n"
    )
    (proc / "cmdline").write_text(cmdline + "\n")


@pytest.mark.parametrize(
    ("vendor", "cmdline", "param", "fragments"),
    [
        ("GenuineIntel", "root=/dev/sda1 quiet", "intel_iommu=on",
         ["add intel_iommu=on to the kernel command line", "VT-d"]),
        ("GenuineIntel", "root=/dev/sda1 intel_iommu=on", "intel_iommu=on",
         ["although the kernel command line has intel_iommu=on", "enable VT-d in the firmware"]),
        ("GenuineIntel", "root=/dev/sda1 intel_iommu=on,igfx_off", "intel_iommu=on",
         ["although the kernel command line has intel_iommu=on"]),
        ("GenuineIntel", "intel_iommu=off quiet", "intel_iommu=on",
         ["has intel_iommu=off: remove it (and add intel_iommu=on)"]),
        ("AuthenticAMD", "iommu=off", "amd_iommu=on", ["has iommu=off: remove it"]),
        ("AuthenticAMD", "quiet", "amd_iommu=on",
         ["add amd_iommu=on", "the IOMMU (AMD-Vi)"]),
        # After "--" the arguments are init's, not the kernel's.
        ("AuthenticAMD", "quiet -- amd_iommu=on", "amd_iommu=on", ["add amd_iommu=on"]),
        ("HygonGenuine", "quiet", "amd_iommu=on", ["add amd_iommu=on"]),
        ("CentaurHauls", "quiet", "", ["knows no kernel parameter for this CPU"]),
    ],
)  # fmt: skip
def test_iommu_off_says_what_to_do(
    tmp_path: Path, vendor: str, cmdline: str, param: str, fragments: list[str]
) -> None:
    write_proc(tmp_path / "proc", vendor, cmdline)
    status = iommu.read_status(tmp_path / "sys", tmp_path / "proc")
    assert (status.enabled, status.groups, status.kernel_param) == (False, 0, param)
    for fragment in fragments:
        assert fragment in status.off_reason()


def test_iommu_on_needs_no_parameter(tmp_path: Path) -> None:
    write_proc(tmp_path / "proc", "GenuineIntel", "intel_iommu=off")
    for group in ("0", "1", "12", "x", ".hidden"):
        (tmp_path / "sys/kernel/iommu_groups" / group).mkdir(parents=True)
    status = iommu.read_status(tmp_path / "sys", tmp_path / "proc")
    assert (status.enabled, status.groups, status.kernel_param) == (True, 3, "")
    assert status.off_reason() == ""


def test_cpuinfo_reads_the_first_processor_only(tmp_path: Path) -> None:
    write_proc(tmp_path, "GenuineIntel", "", flags="fpu sse")  # processor 1 has svm
    assert iommu.read_cpu(tmp_path) == ("GenuineIntel", False)
    (tmp_path / "cpuinfo").write_text("vendor_id : GenuineIntel\nvmx flags : ept vpid\n")
    assert iommu.read_cpu(tmp_path) == ("GenuineIntel", False)  # "vmx flags" is not "flags"
    (tmp_path / "cpuinfo").write_bytes(b"\xff\xfe\x00garbage\n::\n")
    assert iommu.read_cpu(tmp_path) == ("", False)


# ---- readiness sentences -------------------------------------------------------------------


def test_many_group_members_are_counted_not_listed() -> None:
    gpu = pci.PciDevice("0000:05:00.0", 0x030000, "10de", "1b81", "", 3, False)
    members = [readiness.GroupMember(f"0000:1{i}:00.0", 0x0C0330, "xhci_hcd") for i in range(9)]
    status = iommu.IOMMUStatus(True, 4, "intel", True, "", "VT-d", True, "")
    r = readiness.assess(gpu, status, members)
    assert not r.ready
    assert "0000:10:00.0 (USB controller), 0000:11:00.0" in r.reasons[0]
    assert "0000:15:00.0 (USB controller) and 3 more" in r.reasons[0]
    assert "0000:16:00.0" not in r.reasons[0]


def test_vfio_bound_gpu_has_no_driver_warning() -> None:
    status = iommu.IOMMUStatus(True, 4, "intel", True, "", "VT-d", True, "")
    for driver in ("vfio-pci", "pci-stub", ""):
        gpu = pci.PciDevice("0000:01:00.0", 0x030000, "10de", "1b81", driver, 3, False)
        assert readiness.assess(gpu, status, []) == readiness.Readiness(True, (), ())


def test_reset_bug_table() -> None:
    assert readiness.RESET_BUG[("1002", "731f")] == "AMD Navi 10"
    assert readiness.RESET_BUG[("1002", "7340")] == "AMD Navi 14"
    for vendor, device in readiness.RESET_BUG:
        assert len(device) == 4 and device == device.lower() and int(device, 16) >= 0
        assert vendor == "1002"


def test_require_ready_for_create_vm() -> None:
    with pytest.raises(IOMMUError, match="add intel_iommu=on"):
        reader("iommu-off").require_ready("0000:01:00.0")
    with pytest.raises(GPUNotFoundError, match="boot display"):
        reader("laptop-optimus").require_ready("0000:00:02.0")
    with pytest.raises(GPUNotFoundError, match="no PCI device"):
        reader("laptop-optimus").require_ready("0000:09:00.0")
    assert reader("laptop-optimus").require_ready("0000:01:00.0").address == "0000:01:00.0"


# ---- pci.ids -------------------------------------------------------------------------------


def test_pci_ids_lookup(tmp_path: Path) -> None:
    ids = PciIds([tmp_path / "missing", PCI_IDS])
    names = ids.names([("10de", "1c8c"), ("10de", "ffff"), ("abcd", "0001"), ("1002", "ab38")])
    assert names == {
        ("10de", "1c8c"): ("NVIDIA Corporation", "GP107M [GeForce GTX 1050 Ti Mobile]"),
        ("10de", "ffff"): ("NVIDIA Corporation", ""),
        ("abcd", "0001"): ("", ""),
        ("1002", "ab38"): ("Advanced Micro Devices, Inc. [AMD/ATI]", "Navi 10 HDMI Audio"),
    }


def test_pci_ids_ignores_subsystems_and_classes_and_follows_changes(tmp_path: Path) -> None:
    db = tmp_path / "pci.ids"
    db.write_text(
        "# comment\n1234  Vendor A\n\t5678  Device B\n\t\t1234 9999  Subsystem C\n"
        "C 03  Display controller\n\t00  VGA compatible controller\n"
        "4321  After the classes\n\t0001  Not a device\n"
    )
    ids = PciIds([db])
    assert ids.names([("1234", "5678"), ("1234", "9999"), ("4321", "0001")]) == {
        ("1234", "5678"): ("Vendor A", "Device B"),
        ("1234", "9999"): ("Vendor A", ""),
        ("4321", "0001"): ("", ""),
    }
    db.write_text("1234  Vendor A2\n\t5678  Device B2 (a longer name)\n")
    renamed = ("Vendor A2", "Device B2 (a longer name)")
    assert ids.names([("1234", "5678")]) == {("1234", "5678"): renamed}
    db.unlink()
    assert ids.names([("1234", "5678")]) == {("1234", "5678"): ("", "")}


# ---- the fixture trees themselves ----------------------------------------------------------


def snapshot(top: Path) -> dict[str, tuple[str, str]]:
    """Every file and symlink under ``top`` (directories are implied: git keeps no empty one)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(top))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file():
                out[rel] = ("file", path.read_bytes().hex())
    return out


def test_fixture_trees_are_what_build_py_makes(tmp_path: Path) -> None:
    build.build(tmp_path)
    for machine in build.MACHINES:
        assert snapshot(expected.HERE / machine.name) == snapshot(tmp_path / machine.name), (
            f"tests/fixtures/sysfs/{machine.name} differs from build.py: "
            "run python -m tests.fixtures.sysfs.build"
        )
    assert set(MACHINES) == {m.name for m in build.MACHINES}


def test_fixture_symlinks_are_relative_and_readmes_say_what_they_model() -> None:
    for machine in build.MACHINES:
        top = expected.HERE / machine.name
        readme = (top / "README").read_text()
        assert readme.startswith(("Models ", "Not a real machine")), machine.name
        for rel, (kind, target) in snapshot(top).items():
            if kind == "link":
                assert not target.startswith("/"), f"{machine.name}/{rel} -> {target}"
