"""Qt's own client (qdbus, QtDBus as KDE frontends use it) sees the typed error name and
message, and reads the API."""

from __future__ import annotations

import subprocess

from tests.harness import Daemon, PrivateBus

QDBUS = "/usr/lib/qt5/bin/qdbus"


def qdbus(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QDBUS, "--system", *args],
        env=bus.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_qdbus_shows_typed_error(private_bus: PrivateBus, daemon: Daemon) -> None:
    result = qdbus(
        private_bus,
        "org.neuronos.Neuron1",
        "/org/neuronos/Neuron1/Manager",
        "org.neuronos.Neuron1.Manager.GetVM",
        "nosuchvm",
    )
    assert result.returncode != 0
    assert result.stdout.splitlines()[:2] == [
        "Error: org.neuronos.Neuron1.Error.VMNotFound",
        "There is no VM named 'nosuchvm'.",
    ]


def test_qdbus_lists_methods_and_reads_a_property(private_bus: PrivateBus, daemon: Daemon) -> None:
    listing = qdbus(private_bus, "org.neuronos.Neuron1", "/org/neuronos/Neuron1/Manager")
    assert "org.neuronos.Neuron1.Manager.ListVMs()" in listing.stdout
    version = qdbus(
        private_bus,
        "org.neuronos.Neuron1",
        "/org/neuronos/Neuron1/Manager",
        "org.freedesktop.DBus.Properties.Get",
        "org.neuronos.Neuron1.Manager",
        "APIVersion",
    )
    assert version.returncode == 0 and version.stdout.strip() == "3", version.stderr
