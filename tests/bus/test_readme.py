"""The README's busctl examples work, verbatim, against neurond on the test driver."""

from __future__ import annotations

import shlex
from pathlib import Path

from tests.harness import Daemon, PrivateBus, busctl

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[list[str]]:
    lines = [ln.strip() for ln in README.read_text().splitlines()]
    return [shlex.split(ln)[2:] for ln in lines if ln.startswith("busctl --system call ")]


def test_readme_shows_three_busctl_examples() -> None:
    assert len(_examples()) >= 3


def test_readme_busctl_examples_work(private_bus: PrivateBus, daemon: Daemon) -> None:
    for args in _examples():
        result = busctl(private_bus, *args)
        assert result.returncode == 0, (args, result.stderr)
    state = busctl(
        private_bus,
        "get-property",
        "org.neuronos.Neuron1",
        "/org/neuronos/Neuron1/vm/6695eb01_f6a4_8304_79aa_97f2502e193f",
        "org.neuronos.Neuron1.VM",
        "State",
    )
    assert state.stdout.strip() == 's "paused"'
