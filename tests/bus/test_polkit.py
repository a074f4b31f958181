"""Authorization by a real polkitd (TESTING.md): the project's actions, a test's rules, and
non-root callers (uid 65534 through gdbus, which shows the typed error name).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus.conftest import ERR, TEST_PATH
from tests.harness import (
    Daemon,
    PrivateBus,
    busctl,
    gdbus,
    make_test_node_xml,
    node_uri,
    run_as_nobody,
)
from tests.polkit import PrivatePolkit

VM_IFACE = "org.neuronos.Neuron1.VM"
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"

# nobody may run the lifecycle of vm0000 only (checked by name, UUID and owner: the details
# neurond passes; a VM defined outside neurond has owner 0, named root), must authenticate for
# vm-manage, and is refused everything else.
RULES_TEMPLATE = """
polkit.addRule(function(action, subject) {
  if (action.id.indexOf("org.neuronos.neuron1.") != 0 || subject.user != "nobody") return;
  if (action.id == "org.neuronos.neuron1.vm-lifecycle" &&
      action.lookup("vm") == "vm0000" && action.lookup("uuid") == "UUID0" &&
      action.lookup("owner") === "0" && action.lookup("owner_user") === "root") {
    return polkit.Result.YES;
  }
  if (action.id == "org.neuronos.neuron1.vm-manage") return polkit.Result.AUTH_ADMIN;
  return polkit.Result.NO;
});
"""


def _path(uuid: str) -> str:
    return "/org/neuronos/Neuron1/vm/" + uuid.replace("-", "_")


def gdbus_call(
    bus: PrivateBus,
    path: str,
    method: str,
    *args: str,
    nobody: bool = True,
    interactive: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`gdbus call` (which shows the typed error name) on neurond, as uid 65534 by default."""
    cmd = [
        "gdbus",
        "call",
        "--system",
        "--dest",
        "org.neuronos.Neuron1",
        "--object-path",
        path,
        "--method",
        method,
        *(["--interactive"] if interactive else []),
        *args,
    ]
    return subprocess.run(
        run_as_nobody(cmd) if nobody else cmd,
        env=bus.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Setup:
    def __init__(
        self, bus: PrivateBus, polkit: PrivatePolkit, daemon: Daemon, uuids: list[str]
    ) -> None:
        self.bus, self.polkit, self.daemon, self.uuids = bus, polkit, daemon, uuids

    def call(
        self, uuid: str, method: str, *args: str, nobody: bool = True, interactive: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return gdbus_call(
            self.bus,
            _path(uuid),
            f"{VM_IFACE}.{method}",
            *args,
            nobody=nobody,
            interactive=interactive,
        )

    def state(self, uuid: str) -> str:
        out = gdbus(
            self.bus,
            "call",
            "--dest",
            "org.neuronos.Neuron1",
            "--object-path",
            _path(uuid),
            "--method",
            "org.freedesktop.DBus.Properties.Get",
            VM_IFACE,
            "State",
        )
        return out.stdout.strip()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    domains = make_test_node_xml(tmp_path / "node.xml", 2, running_every=1)
    uuids = [d.uuid for d in domains]
    rules = RULES_TEMPLATE.replace("UUID0", uuids[0])
    with PrivateBus(include_system_policies=True) as bus, PrivatePolkit(bus, rules) as polkit:
        daemon = Daemon(
            bus,
            libvirt_uri=node_uri(tmp_path / "node.xml"),
            config={"authorization": {"polkit": True}},
        ).start()
        try:
            yield Setup(bus, polkit, daemon, uuids)
        finally:
            daemon.close()


def _error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    return result.stderr.split("GDBus.Error:", 1)[1].split(":", 1)[0]


def test_polkit_yes_for_the_vm_its_rule_names(setup: Setup) -> None:
    vm0, vm1 = setup.uuids
    ok = setup.call(vm0, "Pause")
    assert ok.returncode == 0, ok.stderr
    assert "paused" in setup.state(vm0)
    # Same action, another VM: the rule sees the details and says no.
    assert _error(setup.call(vm1, "Pause")) == ERR + "PermissionDenied"
    assert "running" in setup.state(vm1)


def test_challenge_without_interaction_is_interactive_authorization_required(
    setup: Setup,
) -> None:
    vm0 = setup.uuids[0]
    assert _error(setup.call(vm0, "SetAutostart", "true")) == INTERACTIVE_REQUIRED
    # Interaction allowed but no authentication agent runs here: polkit says no.
    denied = setup.call(vm0, "SetAutostart", "true", interactive=True)
    assert _error(denied) == ERR + "PermissionDenied"
    assert "vm-manage" in denied.stderr


def test_cancel_of_another_users_job_asks_polkit(setup: Setup) -> None:
    vm1 = setup.uuids[1]
    started = setup.call(vm1, "Shutdown", "{}", nobody=False)
    assert started.returncode == 0, started.stderr
    job = started.stdout.split("'")[1]
    refused = gdbus_call(setup.bus, job, "org.neuronos.Neuron1.Job.Cancel")
    assert _error(refused) == ERR + "PermissionDenied"
    assert "cancel-job-other-user" in refused.stderr


def test_root_is_always_allowed(setup: Setup) -> None:
    vm1 = setup.uuids[1]
    result = setup.call(vm1, "Pause", nobody=False)
    assert result.returncode == 0, result.stderr
    assert "paused" in setup.state(vm1)


def test_without_polkit_only_root_may_act(setup: Setup) -> None:
    vm0 = setup.uuids[0]
    setup.polkit.stop()
    assert _error(setup.call(vm0, "Pause")) == ERR + "PermissionDenied"
    assert "running" in setup.state(vm0)
    assert setup.call(vm0, "Pause", nobody=False).returncode == 0


def test_policy_file_has_api_md_actions_and_defaults() -> None:
    """polkit/org.neuronos.neuron1.policy equals API.md's Authorization table."""
    import xml.etree.ElementTree as ET

    api = Path(__file__).resolve().parents[3] / "shared" / "API.md"
    assert api.exists(), f"API.md expected beside the repository at {api}"
    rows = {}
    for line in api.read_text().splitlines():
        m = re.match(
            r"\| `org\.neuronos\.neuron1\.([a-z-]+)` \|.*\| (\S+) / (\S+) / (\S+) \|$", line
        )
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    assert len(rows) == 6
    policy = ET.parse(
        Path(__file__).resolve().parents[2] / "polkit" / "org.neuronos.neuron1.policy"
    )
    actions = {}
    for action in policy.getroot().iter("action"):
        d = action.find("defaults")
        assert d is not None and action.findtext("message")
        actions[action.get("id", "").removeprefix("org.neuronos.neuron1.")] = (
            d.findtext("allow_any"),
            d.findtext("allow_inactive"),
            d.findtext("allow_active"),
        )
    assert actions == rows


def test_pkaction_knows_every_action_with_its_defaults(tmp_path: Path) -> None:
    """polkit's own tool reads the shipped policy file (run against the private polkitd)."""
    with PrivateBus(include_system_policies=True) as bus, PrivatePolkit(bus, "") as _:
        out = subprocess.run(
            ["pkaction", "--verbose"],
            env=bus.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    for action in (
        "vm-lifecycle",
        "vm-console",
        "vm-manage",
        "guest",
        "guest-exec",
        "cancel-job-other-user",
    ):
        assert f"org.neuronos.neuron1.{action}:" in out.stdout
    block = out.stdout.split("org.neuronos.neuron1.vm-manage:", 1)[1].split("\n\n", 1)[0]
    assert "implicit active:   auth_admin_keep" in block


# python-dbusmock's polkitd stands in for polkit where a real one cannot: a hang, a delay,
# and a prompt that a person answered (the mock grants what SetAllowed lists).
MOCK_OWN = (
    '<policy user="root"><allow own="org.freedesktop.PolicyKit1"/></policy>'
    '<policy context="default"><allow send_destination="org.freedesktop.PolicyKit1"/></policy>'
)


class MockPolkit:
    def __init__(self, bus: PrivateBus) -> None:
        self.bus = bus
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=bus.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while busctl(bus, "status", "org.freedesktop.PolicyKit1").returncode != 0:
            assert time.monotonic() < deadline and self.proc.poll() is None, "mock polkitd"
            time.sleep(0.05)

    def control(self, method: str, *args: str) -> None:
        out = busctl(
            self.bus,
            "call",
            "org.freedesktop.PolicyKit1",
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.DBus.Mock",
            method,
            *args,
        )
        assert out.returncode == 0, out.stderr

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def mock_setup() -> Iterator[tuple[PrivateBus, MockPolkit, Daemon]]:
    with PrivateBus(extra_config=MOCK_OWN) as bus:
        mock = MockPolkit(bus)
        daemon = Daemon(
            bus, config={"authorization": {"polkit": True}, "timeouts": {"call_s": 4}}
        ).start()
        try:
            yield bus, mock, daemon
        finally:
            daemon.close()
            mock.stop()


def _nobody_call(
    bus: PrivateBus, method: str, *args: str, interactive: bool = False
) -> subprocess.CompletedProcess[str]:
    return gdbus_call(bus, TEST_PATH, f"{VM_IFACE}.{method}", *args, interactive=interactive)


def test_hanging_polkit_is_a_bounded_permission_denied(
    mock_setup: tuple[PrivateBus, MockPolkit, Daemon],
) -> None:
    bus, mock, _ = mock_setup
    mock.control("SetAllowed", "as", "1", "org.neuronos.neuron1.vm-lifecycle")
    mock.control("SimulateHang", "b", "true")
    started = time.monotonic()
    refused = _nobody_call(bus, "Pause")
    elapsed = time.monotonic() - started
    assert _error(refused) == ERR + "PermissionDenied"
    assert "did not answer" in refused.stderr
    assert elapsed < 4, elapsed  # the polkit bound (call_s / 2), inside the call bound


def test_slow_polkit_still_answers(mock_setup: tuple[PrivateBus, MockPolkit, Daemon]) -> None:
    bus, mock, _ = mock_setup
    mock.control("SetAllowed", "as", "1", "org.neuronos.neuron1.vm-lifecycle")
    mock.control("SetDelay", "d", "1")
    result = _nobody_call(bus, "Pause")
    assert result.returncode == 0, result.stderr


def test_interactive_prompt_answered_yes(mock_setup: tuple[PrivateBus, MockPolkit, Daemon]) -> None:
    bus, mock, _ = mock_setup
    mock.control("SetAllowed", "as", "1", "org.neuronos.neuron1.vm-manage")
    result = _nobody_call(bus, "SetAutostart", "true", interactive=True)
    assert result.returncode == 0, result.stderr
    # An action the person did not grant stays refused.
    assert _error(_nobody_call(bus, "Pause", interactive=True)) == ERR + "PermissionDenied"


def test_lifecycle_allowed_uid_may_stop_and_start_but_not_create_or_delete(setup: Setup) -> None:
    vm0 = setup.uuids[0]
    stopped = setup.call(vm0, "Shutdown", "{}")
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10
    while "shutoff" not in setup.state(vm0):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert setup.call(vm0, "Start", "{}").returncode == 0
    assert "running" in setup.state(vm0)
    for interactive, expected in ((False, INTERACTIVE_REQUIRED), (True, ERR + "PermissionDenied")):
        delete = setup.call(vm0, "Delete", "{'force': <true>}", interactive=interactive)
        assert _error(delete) == expected
        create = gdbus_call(
            setup.bus,
            "/org/neuronos/Neuron1/Manager",
            "org.neuronos.Neuron1.Manager.CreateVM",
            "{'name': <'evil'>}",
            interactive=interactive,
        )
        assert _error(create) == expected
    assert "running" in setup.state(vm0)
    listed = gdbus(
        setup.bus,
        "call",
        "--dest",
        "org.neuronos.Neuron1",
        "--object-path",
        "/org/neuronos/Neuron1/Manager",
        "--method",
        "org.neuronos.Neuron1.Manager.ListVMs",
    )
    assert "evil" not in listed.stdout and listed.stdout.count("vm000") == 2
