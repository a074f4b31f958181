"""The documents a frontend author reads stay true to the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from neurond.errors import ALL_ERRORS

REPO = Path(__file__).resolve().parents[2]


def test_errors_doc_has_every_error_with_code_and_flag() -> None:
    text = (REPO / "docs" / "errors.md").read_text()
    for e in ALL_ERRORS:
        flag = "yes" if e.recoverable else "no"
        assert f"| {e.number} | `{e.name}` | `{e.code}` | {flag} |" in text, e.name


def test_api_doc_is_generated_from_the_interface_xml() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-api-doc.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_gdbus_codegen_builds_a_c_client(tmp_path: Path) -> None:
    result = subprocess.run(
        ["gdbus-codegen", "--interface-prefix", "org.neuronos.Neuron1.", "--c-namespace", "Neuron",
         "--generate-c-code", str(tmp_path / "neuron-generated"),
         str(REPO / "dbus" / "org.neuronos.Neuron1.xml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "neuron-generated.h").read_text()
    assert "neuron_manager_call_list_vms" in header and "neuron_vm_call_start" in header


def test_catalog_compiles_with_every_message_id(tmp_path: Path) -> None:
    from neurond import messages

    catalog = tmp_path / "usr/lib/systemd/catalog"
    catalog.mkdir(parents=True)
    (catalog / "neurond.catalog").write_text((REPO / "systemd" / "neurond.catalog").read_text())
    update = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--update-catalog"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert update.returncode == 0 and not update.stderr, update.stderr
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    ids = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert ids == set(messages.ALL.values())


def test_every_member_has_a_docstring() -> None:
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "dbus" / "org.neuronos.Neuron1.xml").getroot()
    for iface in root.iter("interface"):
        for el in [
            iface,
            *iface.findall("method"),
            *iface.findall("property"),
            *iface.findall("signal"),
        ]:
            docs = [
                a
                for a in el.findall("annotation")
                if a.get("name") == "org.gtk.GDBus.DocString" and a.get("value")
            ]
            assert docs, f"{iface.get('name')}.{el.get('name')}"
