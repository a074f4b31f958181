"""The shipped unit: hardening measured by systemd itself, and no test hooks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "neurond.service"


def test_security_exposure_is_at_most_4() -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for neurond.service: ([0-9.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    print(f"systemd-analyze security exposure: {match.group(1)}")
    assert float(match.group(1)) <= 4.0


def test_unit_is_notify_with_bus_name_and_no_test_hooks() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "BusName=org.neuronos.Neuron1" in text
    assert "--test-hooks" not in text and "NEUROND_FAULTS" not in text


def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    """systemd's own parser accepts the unit (it exits 0 even on warnings: stderr must be empty).
    ExecStart points at this checkout's neurond, since /usr/bin/neurond is not installed here."""
    neurond = Path(sys.executable).parent / "neurond"
    assert neurond.exists()
    unit = tmp_path / "neurond.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/neurond", str(neurond)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr
