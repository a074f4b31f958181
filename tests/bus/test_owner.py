"""VM ownership (issue 12): the ``Owner`` property and the shipped owner rules under a real polkitd.

Two non-root users call through gdbus under setpriv (TESTING.md): A is ``nobody`` (65534) and B
is ``daemon`` (1), both in every Debian passwd, so polkit names them. A test rule lets both
create VMs (vm-manage without a VM UUID: CreateVM only); everything else is decided by the
policy's defaults and polkit/70-neurond-owner.rules, loaded as a distribution installs it.
The depth (CreateVM on a real libvirtd, a daemon restart, Rename) is in
tests/integration/test_edit_real.py.
"""

from __future__ import annotations

import contextlib
import pwd
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from neurond.bus.spec import VM_IFACE
from neurond.domain.parse import METADATA_NS
from tests.bus.conftest import (
    ERR,
    FAKE_POLKIT_POLICY,
    MANAGER_PATH,
    TEST_PATH,
    VM,
    VM_METHOD_ARGS,
    Client,
    FakePolkit,
    NobodyClient,
    gdbus_error,
)
from tests.bus.test_create import created
from tests.harness import Daemon, PrivateBus, make_test_node_xml, node_uri
from tests.polkit import OWNER_RULES, POLICY, PrivatePolkit

PREFIX = "org.neuronos.Neuron1"
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
USER_A = pwd.getpwnam("nobody")
USER_B = pwd.getpwnam("daemon")
QEMU = {"libvirt": {"domain_type": "qemu"}}

# The test's own rule: A and B may create VMs (CreateVM passes no uuid), nothing more.
CREATE_RULES = """
polkit.addRule(function(action, subject) {
  if (action.id == "org.neuronos.neuron1.vm-manage" && action.lookup("uuid") === undefined &&
      (subject.user == "nobody" || subject.user == "daemon")) {
    return polkit.Result.YES;
  }
});
"""


def as_user(user: pwd.struct_passwd | None, cmd: list[str]) -> list[str]:
    if user is None:
        return cmd
    return [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        *cmd,
    ]


def _iface(path: str) -> str:
    kind = "Manager" if path == MANAGER_PATH else "Job" if "/job/" in path else "VM"
    return f"{PREFIX}.{kind}"


class Bus:
    """gdbus on neurond as root (user None), A or B; typed errors as gdbus prints them."""

    def __init__(self, bus: PrivateBus) -> None:
        self.bus = bus

    def call(
        self, user: pwd.struct_passwd | None, path: str, method: str, *args: str
    ) -> subprocess.CompletedProcess[str]:
        iface = "org.freedesktop.DBus.Properties" if method == "Get" else _iface(path)
        cmd = ["gdbus", "call", "--system", "--dest", PREFIX, "--object-path", path,
               "--method", f"{iface}.{method}", *args]  # fmt: skip
        return subprocess.run(
            as_user(user, cmd),
            env=self.bus.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def ok(self, user: pwd.struct_passwd | None, path: str, method: str, *args: str) -> str:
        result = self.call(user, path, method, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def error(self, user: pwd.struct_passwd | None, path: str, method: str, *args: str) -> str:
        result = self.call(user, path, method, *args)
        assert result.returncode != 0, result.stdout
        return gdbus_error(result.stderr)

    def get(self, path: str, prop: str) -> str:
        out = self.ok(None, path, "Get", _iface(path), prop)
        m = re.fullmatch(r"\(<(?:uint32 )?'?([^'>]*)'?>,\)", out.strip())
        assert m, out
        return m.group(1)

    def create(self, user: pwd.struct_passwd, name: str) -> str:
        out = self.ok(user, MANAGER_PATH, "CreateVM", f"{{'name': <'{name}'>}}")
        vm, job = re.findall(r"'(/[^']+)'", out)
        self.wait(job, "State", "completed")
        return vm

    def wait(self, path: str, prop: str, value: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.get(path, prop)) != value:
            assert time.monotonic() < deadline, f"{path} {prop} is still {now}"
            time.sleep(0.05)


@contextlib.contextmanager
def polkit_and_neurond(
    libvirt_uri: str = "test:///default", rules: str = CREATE_RULES, shipped: bool = True
) -> Iterator[Bus]:
    with (
        PrivateBus(include_system_policies=True) as bus,
        PrivatePolkit(bus, rules, shipped_rules=shipped),
        Daemon(bus, libvirt_uri=libvirt_uri, config={**QEMU, "authorization": {"polkit": True}}),
    ):
        yield Bus(bus)


@pytest.fixture
def owners() -> Iterator[Bus]:
    with polkit_and_neurond() as bus:
        yield bus


def test_the_owner_may_start_and_stop_their_vm_and_not_the_others(owners: Bus) -> None:
    a_vm = owners.create(USER_A, "a-vm")
    b_vm = owners.create(USER_B, "b-vm")
    assert owners.get(a_vm, "Owner") == str(USER_A.pw_uid)
    assert owners.get(b_vm, "Owner") == str(USER_B.pw_uid)
    assert owners.get(TEST_PATH, "Owner") == "0"  # the test driver's own VM

    # A runs their own VM: Start, Shutdown (a job), Start, ForceOff — no password.
    owners.ok(USER_A, a_vm, "Start", "{}")
    assert owners.get(a_vm, "State") == "running"
    job = re.findall(r"'(/[^']+)'", owners.ok(USER_A, a_vm, "Shutdown", "{}"))[0]
    owners.wait(job, "State", "completed")
    owners.wait(a_vm, "State", "shutoff")
    owners.ok(USER_A, a_vm, "Start", "{}")
    owners.ok(USER_A, a_vm, "ForceOff")
    assert owners.get(a_vm, "State") == "shutoff"

    # …and not B's, stopped or running; B may.
    assert owners.error(USER_A, b_vm, "Start", "{}") == ERR + "PermissionDenied"
    assert owners.get(b_vm, "State") == "shutoff"
    owners.ok(USER_B, b_vm, "Start", "{}")
    for method, args in (("Shutdown", ("{}",)), ("ForceOff", ()), ("Pause", ())):
        assert owners.error(USER_A, b_vm, method, *args) == ERR + "PermissionDenied"
    assert owners.get(b_vm, "State") == "running"
    owners.ok(USER_B, b_vm, "ForceOff")
    # B is refused A's VM the same way.
    assert owners.error(USER_B, a_vm, "Start", "{}") == ERR + "PermissionDenied"
    assert owners.get(a_vm, "State") == "shutoff"


def test_console_and_guest_follow_the_owner_too(owners: Bus) -> None:
    a_vm = owners.create(USER_A, "a-vm")
    owners.ok(USER_A, a_vm, "Start", "{}")
    # The owner is past authorization: what is left is the test driver (no display, no agent).
    assert "'kind': <'none'>" in owners.ok(USER_A, a_vm, "GetDisplay")
    assert owners.error(USER_A, a_vm, "GuestPing") == ERR + "GuestAgentUnavailable"
    for method in ("GetDisplay", "GuestPing", "GuestInfo"):
        assert owners.error(USER_B, a_vm, method) == ERR + "PermissionDenied"


def test_unowned_vms_and_other_actions_keep_the_policy_defaults(owners: Bus) -> None:
    a_vm = owners.create(USER_A, "a-vm")
    # A VM defined outside neurond (owner 0): no rule decides, the defaults ask for an admin.
    assert owners.error(USER_A, TEST_PATH, "Pause") == INTERACTIVE_REQUIRED
    assert owners.get(TEST_PATH, "State") == "running"
    # Settings are vm-manage, which the owner rules leave alone (auth_admin_keep).
    assert owners.error(USER_A, a_vm, "SetAutostart", "true") == INTERACTIVE_REQUIRED
    assert owners.error(USER_A, a_vm, "Rename", "mine") == INTERACTIVE_REQUIRED
    # Root renames it: the owner, and with it the owner's access, stay.
    owners.ok(None, a_vm, "Rename", "renamed")
    assert owners.get(a_vm, "Name") == "renamed"
    assert owners.get(a_vm, "Owner") == str(USER_A.pw_uid)
    owners.ok(USER_A, a_vm, "Start", "{}")
    assert owners.error(USER_B, a_vm, "ForceOff") == ERR + "PermissionDenied"


def _owned_node(path: Path, owners: dict[int, str]) -> list[str]:
    """make_test_node_xml's domains, with neurond's metadata (owner attribute) on some."""
    domains = make_test_node_xml(path, 4, running_every=0)
    tree = ET.parse(path)
    for i, dom in enumerate(tree.getroot().iter("domain")):
        if i in owners:
            meta = ET.SubElement(dom, "metadata")
            ET.SubElement(meta, f"{{{METADATA_NS}}}vm", profile="linux", owner=owners[i])
    tree.write(path, encoding="unicode")
    return ["/org/neuronos/Neuron1/vm/" + d.uuid.replace("-", "_") for d in domains]


def test_owner_is_read_from_the_domain_metadata_at_every_start(tmp_path: Path) -> None:
    """The metadata, not the daemon's memory, holds the owner: a restart reads it again."""
    node = tmp_path / "node.xml"
    paths = _owned_node(node, {1: str(USER_A.pw_uid), 2: "-5", 3: "4294967296"})
    expected = ["0", str(USER_A.pw_uid), "0", "0"]  # none, A, and two that are not uids
    with PrivateBus() as bus:
        owners = Bus(bus)
        for _ in range(2):
            with Daemon(bus, libvirt_uri=node_uri(node)):
                assert [owners.get(p, "Owner") for p in paths] == expected


def test_owners_from_metadata_under_the_rules(tmp_path: Path) -> None:
    """VMs owned by metadata alone (as after a restart); an owner uid without a user name
    matches nobody, since the rules compare names."""
    nameless = 4242
    assert nameless not in {p.pw_uid for p in pwd.getpwall()}
    node = tmp_path / "node.xml"
    paths = _owned_node(node, {1: str(USER_A.pw_uid), 2: str(nameless)})
    with polkit_and_neurond(node_uri(node)) as owners:
        owners.ok(USER_A, paths[1], "Start", "{}")
        assert owners.get(paths[1], "State") == "running"
        assert owners.error(USER_B, paths[1], "ForceOff") == ERR + "PermissionDenied"
        for user in (USER_A, USER_B):
            assert owners.error(user, paths[2], "Start", "{}") == ERR + "PermissionDenied"
            assert owners.error(user, paths[0], "Start", "{}") == INTERACTIVE_REQUIRED
        owners.ok(None, paths[2], "Start", "{}")  # root still may


# For every check on a VM: AUTH_ADMIN when neurond passed the owner (0, named root, for the
# test driver's VM), NO when it did not. Without interaction the first is a typed error of its
# own, so each method shows which it was.
DETAILS_RULES = """
polkit.addRule(function(action, subject) {
  if (action.id.indexOf("org.neuronos.neuron1.") != 0 || action.lookup("uuid") === undefined) {
    return;
  }
  if (action.lookup("owner") === "0" && action.lookup("owner_user") === "root") {
    return polkit.Result.AUTH_ADMIN;
  }
  return polkit.Result.NO;
});
"""


def test_every_vm_method_passes_the_owner_to_polkit() -> None:
    assert set(VM_METHOD_ARGS) == {m.name for m in VM_IFACE.methods}, "a VM method without args"
    with polkit_and_neurond(rules=DETAILS_RULES, shipped=False) as owners:
        for method, args in VM_METHOD_ARGS.items():
            assert owners.error(USER_A, TEST_PATH, method, *args) == INTERACTIVE_REQUIRED, method
        assert owners.get(TEST_PATH, "State") == "running"


def test_the_rules_name_only_actions_of_the_policy() -> None:
    named = set(re.findall(r'"(org\.neuronos\.neuron1\.[a-z-]+)"', OWNER_RULES.read_text()))
    declared = {a.get("id") for a in ET.parse(POLICY).getroot().iter("action")}
    assert named == {
        "org.neuronos.neuron1.vm-lifecycle",
        "org.neuronos.neuron1.vm-console",
        "org.neuronos.neuron1.guest",
    }
    assert named <= declared


async def test_a_retained_grant_is_not_inherited_by_a_vm_that_takes_the_name() -> None:
    """polkit's auth_admin_keep: neurond keeps a retained grant per caller, action and VM. A
    VM that later bears the same name (the old one renamed, a new one created) is another VM,
    perhaps of another owner: polkit is asked again. The (fake) authority grants the first
    check with retention and refuses every later one."""
    fake = FakePolkit(lambda action: (not fake.checks[1:], True))
    with PrivateBus(extra_config=FAKE_POLKIT_POLICY) as bus:
        await fake.start(bus.address)
        root = Client(await MessageBus(bus_address=bus.address).connect())
        with Daemon(bus, config={"authorization": {"polkit": True}}):
            nobody = await NobodyClient().start(bus.address)
            try:
                autostart = (VM, "SetAutostart", "b", [True])
                assert await nobody.call(TEST_PATH, *autostart) == "ok"  # granted and kept
                assert await nobody.call(TEST_PATH, *autostart) == "ok"  # polkit not asked
                assert len(fake.checks) == 1, fake.checks
                # "test" goes away under another name; a new VM takes the name "test".
                await root.call(TEST_PATH, VM, "ForceOff")
                await root.call(TEST_PATH, VM, "Rename", "s", ["old-test"])
                await root.call(TEST_PATH, VM, "SetAutostart", "b", [False])
                new = await created(root, name="test")
                assert await nobody.call(new, *autostart) == ERR + "PermissionDenied"
                assert len(fake.checks) == 2 and fake.checks[1][1]["vm"] == "test", fake.checks
                assert await root.get(new, VM, "Autostart") is False
            finally:
                await nobody.close()
                root.bus.disconnect()
                fake.close()
