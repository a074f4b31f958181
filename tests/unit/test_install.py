"""`make install DESTDIR=…` lays the tree the packages ship; the shipped config lists every key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from neurond import config

REPO = Path(__file__).resolve().parents[2]
EXPECTED = [
    "usr/lib/systemd/system/neurond.service",
    "usr/share/dbus-1/system.d/org.neuronos.Neuron1.conf",
    "usr/share/dbus-1/system-services/org.neuronos.Neuron1.service",
    "usr/share/dbus-1/interfaces/org.neuronos.Neuron1.xml",
    "usr/share/polkit-1/actions/org.neuronos.neuron1.policy",
    "etc/neurond/neurond.toml",
    "usr/lib/systemd/catalog/neurond.catalog",
    "usr/share/doc/neurond/README.md",
    "usr/share/doc/neurond/examples/70-neurond-owner.rules",
    "usr/bin/neurond",
    "usr/bin/neuronctl",
]


def test_make_install_destdir(tmp_path: Path) -> None:
    result = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={tmp_path}", f"PYTHON={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    missing = [p for p in EXPECTED if not (tmp_path / p).exists()]
    assert not missing, missing
    packages = list(tmp_path.glob("usr/lib/python3*/site-packages/neurond/daemon.py"))
    assert packages, sorted(str(p) for p in tmp_path.rglob("daemon.py"))
    assert os.access(tmp_path / "usr/bin/neurond", os.X_OK)
    # The owner rules are an example unless a distribution asks for them (docs/security.md).
    assert not (tmp_path / "usr/share/polkit-1/rules.d").exists()


def test_owner_rules_active_when_a_distribution_asks(tmp_path: Path) -> None:
    result = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={tmp_path}", f"PYTHON={sys.executable}",
         "OWNER_RULES=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    active = tmp_path / "usr/share/polkit-1/rules.d/70-neurond-owner.rules"
    assert active.read_text() == (REPO / "polkit" / "70-neurond-owner.rules").read_text()


def _uncommented(text: str) -> dict[str, Any]:
    lines = [re.sub(r"^#(\w+ = )", r"\1", line) for line in text.splitlines()]
    return tomllib.loads("\n".join(lines))


def test_shipped_config_lists_every_key_with_its_default() -> None:
    data = _uncommented((REPO / "packaging" / "neurond.toml").read_text())
    defaults = config.Config().model_dump(mode="json")
    assert config.parse(data).model_dump(mode="json") == defaults
    assert set(data) == set(defaults)
    for section, values in defaults.items():
        if isinstance(values, dict):
            assert set(data[section]) == set(values), section
