"""neurond driven by the real command-line clients: busctl (sd-bus) and gdbus (GLib).

Ordering of a job's InterfacesAdded before the method reply cannot be seen here (gdbus monitor
shows no replies): test_jobs.py proves it with a recorder on a dbus-fast connection.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.bus.conftest import MANAGER, MANAGER_PATH, NAME, ROOT, TEST_PATH, TEST_UUID, VM
from tests.harness import PrivateBus, busctl, gdbus

FIRST_JOB = f"{ROOT}/job/1"


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result.stdout


def gdbus_call(
    bus: PrivateBus, path: str, method: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return gdbus(bus, "call", "--dest", NAME, "--object-path", path, "--method", method, *args)


def vm_state(bus: PrivateBus) -> str:
    return ok(busctl(bus, "get-property", NAME, TEST_PATH, VM, "State")).strip()


class Monitor:
    """`gdbus monitor --system --dest NAME` in the background; its output lines as they come."""

    def __init__(self, bus: PrivateBus) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["gdbus", "monitor", "--system", "--dest", NAME],
            env=bus.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(
        self,
        predicate: Callable[[str], bool],
        timeout: float = 5.0,
        poke: Callable[[], Any] | None = None,
    ) -> str:
        """The first line matching ``predicate``; ``poke`` runs between looks (to cause it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.proc.poll() is not None:
                break
            if poke is not None:
                poke()
            time.sleep(0.05)
        raise AssertionError(
            "gdbus monitor did not print it; it printed:\n" + "\n".join(self.lines)
        )

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


@pytest.fixture
def monitor(daemon: Any, private_bus: PrivateBus) -> Iterator[Monitor]:
    m = Monitor(private_bus)
    yield m
    m.close()


# ---- busctl -----------------------------------------------------------------------------


def test_busctl_list_vms(daemon: Any, private_bus: PrivateBus) -> None:
    out = ok(busctl(private_bus, "call", NAME, MANAGER_PATH, MANAGER, "ListVMs"))
    assert out.strip() == f'a(ssos) 1 "test" "{TEST_UUID}" "{TEST_PATH}" "running"'


def test_busctl_get_property_state(daemon: Any, private_bus: PrivateBus) -> None:
    assert vm_state(private_bus) == 's "running"'
    ok(busctl(private_bus, "call", NAME, TEST_PATH, VM, "Pause"))
    assert vm_state(private_bus) == 's "paused"'


def test_busctl_shows_the_error_message(daemon: Any, private_bus: PrivateBus) -> None:
    result = busctl(private_bus, "call", NAME, MANAGER_PATH, MANAGER, "GetVM", "s", "nosuchvm")
    assert result.returncode != 0
    assert "nosuchvm" in result.stderr


def test_busctl_shutdown_with_uint_timeout(daemon: Any, private_bus: PrivateBus) -> None:
    options = ["2", "timeout_s", "u", "30", "force", "b", "false"]
    out = ok(busctl(private_bus, "call", NAME, TEST_PATH, VM, "Shutdown", "a{sv}", *options))
    assert out.strip() == f'o "{FIRST_JOB}"'


# ---- gdbus ------------------------------------------------------------------------------


def test_gdbus_get_vm_unknown_shows_name_and_message(daemon: Any, private_bus: PrivateBus) -> None:
    result = gdbus_call(private_bus, MANAGER_PATH, f"{MANAGER}.GetVM", "nosuchvm")
    assert result.returncode != 0
    assert "GDBus.Error:org.neuronos.Neuron1.Error.VMNotFound" in result.stderr
    assert "nosuchvm" in result.stderr
    assert "Error return with body of type" not in result.stderr


def test_gdbus_get_vm(daemon: Any, private_bus: PrivateBus) -> None:
    out = ok(gdbus_call(private_bus, MANAGER_PATH, f"{MANAGER}.GetVM", "test"))
    assert out.strip() == f"(objectpath '{TEST_PATH}',)"


def test_gdbus_shutdown_with_int32_timeout(daemon: Any, private_bus: PrivateBus) -> None:
    # gdbus sends <30> as an int32 variant: neurond must accept any integer type.
    out = ok(gdbus_call(private_bus, TEST_PATH, f"{VM}.Shutdown", "{'timeout_s': <30>}"))
    assert out.strip() == f"(objectpath '{FIRST_JOB}',)"
    deadline = time.monotonic() + 5
    while vm_state(private_bus) != 's "shutoff"':
        assert time.monotonic() < deadline, "the VM did not shut off"
        time.sleep(0.05)


def test_gdbus_sees_invalid_argument_with_its_message(daemon: Any, private_bus: PrivateBus) -> None:
    result = gdbus_call(private_bus, TEST_PATH, f"{VM}.Shutdown", "{'timeout_s': <0>}")
    assert result.returncode != 0
    assert "GDBus.Error:org.neuronos.Neuron1.Error.InvalidArgument" in result.stderr
    assert "timeout_s" in result.stderr
    assert "Error return with body of type" not in result.stderr
    assert vm_state(private_bus) == 's "running"'


def test_gdbus_monitor_sees_the_job_added_from_the_root(
    monitor: Monitor, private_bus: PrivateBus
) -> None:
    monitor.wait_for(lambda line: "is owned by" in line)
    # gdbus monitor subscribes only after printing that line: toggle Autostart until it
    # shows the signal, so the subscription is surely in place before the Shutdown.
    flip = iter([True, False] * 100)

    def toggle() -> None:
        enabled = "true" if next(flip) else "false"
        ok(busctl(private_bus, "call", NAME, TEST_PATH, VM, "SetAutostart", "b", enabled))

    monitor.wait_for(lambda line: "PropertiesChanged" in line and "Autostart" in line, poke=toggle)
    ok(gdbus_call(private_bus, TEST_PATH, f"{VM}.Shutdown", "{}"))
    added = monitor.wait_for(lambda line: "InterfacesAdded" in line)
    assert added.startswith(f"{ROOT}: org.freedesktop.DBus.ObjectManager.InterfacesAdded "), added
    assert f"'{FIRST_JOB}'" in added
    assert "'shutdown-vm'" in added
    completed = f"{FIRST_JOB}: org.neuronos.Neuron1.Job.Completed (true, '', '')"
    monitor.wait_for(lambda line: line.startswith(completed))
