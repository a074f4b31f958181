"""D-Bus activation: the shipped activation file names the unit, and the bus starts neurond
on the first call (a copy whose Exec= runs this checkout: there is no systemd here)."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from tests.harness import PrivateBus, busctl, to_toml

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "dbus" / "org.neuronos.Neuron1.service"


def _read(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser["D-BUS Service"]


def test_shipped_file_hands_activation_to_systemd() -> None:
    service = _read(SHIPPED)
    assert service["Name"] == "org.neuronos.Neuron1"
    assert service["SystemdService"] == "neurond.service"
    assert service["User"] == "root"


def test_first_call_activates_neurond(tmp_path: Path) -> None:
    services = tmp_path / "services"
    services.mkdir()
    config = tmp_path / "neurond.toml"
    config.write_text(
        to_toml(
            {
                "authorization": {"polkit": False},
                "storage": {"image_dir": str(tmp_path), "state_dir": str(tmp_path)},
            }
        )
    )
    log = tmp_path / "neurond.log"
    text = (
        SHIPPED.read_text()
        .replace(
            "Exec=/bin/false",
            f"Exec=/bin/sh -c 'exec {sys.executable} -m neurond --system --libvirt-uri "
            f"test:///default --config {config} --log-target console 2>>{log}'",
        )
        .replace("SystemdService=neurond.service\n", "")
    )
    (services / "org.neuronos.Neuron1.service").write_text(text)
    with PrivateBus(extra_config=f"<servicedir>{services}</servicedir>") as bus:
        try:
            result = busctl(
                bus,
                "call",
                "org.neuronos.Neuron1",
                "/org/neuronos/Neuron1/Manager",
                "org.neuronos.Neuron1.Manager",
                "ListVMs",
            )
            assert result.returncode == 0, result.stderr + (log.read_text() if log.exists() else "")
            assert '"test"' in result.stdout
        finally:
            subprocess.run(["pkill", "-f", "--", f"--config {config}"], check=False)
