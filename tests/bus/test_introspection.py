"""The interface file, the live introspection, the spec module and API.md agree.

- ``dbus/org.neuronos.Neuron1.xml`` is exactly what the running daemon introspects at the
  Manager, a VM and a Job path, and exactly ``python -m neurond.bus.spec``;
- every member in the file is in API.md with the same signature and argument names; every
  API.md member is in the file or in ``neurond.bus.spec.NOT_YET_IMPLEMENTED`` (a list that only
  shrinks, so everything in it must really be absent);
- the annotations API.md asks for (argument names, ``ForceGVariant`` on ``ay``, QtDBus type
  names, ``EmitsChangedSignal=const``);
- every method is either a read or has a polkit action, as API.md's Authorization says.

API.md lives in ``shared/`` beside the repository (a copy beside the clone in CI).
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from neurond.bus import spec
from neurond.bus.service import ACTIONS, READS
from tests.bus.conftest import JOB, MANAGER, MANAGER_PATH, ROOT, TEST_PATH, VM, Client
from tests.harness import REPO_ROOT, Daemon

XML_FILE = REPO_ROOT / "dbus" / "org.neuronos.Neuron1.xml"
API_MD = Path(__file__).resolve().parents[3] / "shared" / "API.md"
PREFIX = "org.neuronos.Neuron1."
HARDWARE = PREFIX + "Hardware"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"
FORCE_GVARIANT = "org.gtk.GDBus.C.ForceGVariant"
QT_OUT = "org.qtproject.QtDBus.QtTypeName.Out"
CONST_PROPERTIES = {"VM.UUID", "Job.Operation", "Job.StartTime", "Job.StartedByUID"}

# ---- reading introspection XML --------------------------------------------------------------


def annotations(el: ET.Element) -> dict[str, str]:
    return {a.get("name", ""): a.get("value", "") for a in el.findall("annotation")}


def canonical(iface: ET.Element) -> dict[str, Any]:
    """An interface element as comparable data (in-args default to direction "in")."""

    def members(tag: str) -> dict[str, Any]:
        els = iface.findall(tag)
        names = [e.get("name") for e in els]
        assert len(names) == len(set(names)), f"{iface.get('name')}: duplicate {tag}s {names}"
        return {e.get("name"): describe(tag, e) for e in els}

    def describe(tag: str, el: ET.Element) -> Any:
        if tag == "property":
            return (el.get("type"), el.get("access"), annotations(el))
        args = [
            (a.get("name"), a.get("type"),
             a.get("direction", "in") if tag == "method" else "out", annotations(a))
            for a in el.findall("arg")
        ]  # fmt: skip
        return {"args": args, "annotations": annotations(el)}

    return {
        "annotations": annotations(iface),
        "methods": members("method"),
        "properties": members("property"),
        "signals": members("signal"),
    }


def interfaces(root: ET.Element) -> dict[str, ET.Element]:
    return {i.get("name", ""): i for i in root.findall("interface")}


def file_interfaces() -> dict[str, ET.Element]:
    return interfaces(ET.parse(XML_FILE).getroot())


def short(iface: str) -> str:
    return iface.removeprefix(PREFIX)


async def introspect(client: Client, path: str) -> ET.Element:
    (xml,) = await client.call(path, INTROSPECTABLE, "Introspect")
    return ET.fromstring(xml)


# ---- reading API.md -------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    kind: str  # method | property | signal
    iface: str  # short name: Manager, VM, Job, Hardware
    name: str
    ins: tuple[tuple[str, str], ...] = ()  # (type, name)
    outs: tuple[tuple[str, str], ...] = ()
    type: str = ""  # property type
    const: bool = False

    @property
    def key(self) -> str:
        return f"{self.iface}.{self.name}"


@dataclass
class Api:
    members: dict[tuple[str, str], Member] = field(default_factory=dict)  # (kind, key)
    actions: dict[str, list[str]] = field(default_factory=dict)  # action → methods covered
    reads: set[str] = field(default_factory=set)

    def add(self, m: Member) -> None:
        assert (m.kind, m.key) not in self.members, f"API.md lists {m.key} twice"
        self.members[(m.kind, m.key)] = m

    def find(self, kind: str, key: str) -> Member | None:
        return self.members.get((kind, key))


def parse_args(text: str) -> tuple[tuple[str, str], ...]:
    """'s path, as args, a{sv} options' → (('s', 'path'), ('as', 'args'), ('a{sv}', 'options'))."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        sig, name = part.split()
        out.append((sig, name))
    return tuple(out)


def parse_api(text: str) -> Api:
    api = Api()
    sections = re.split(r"^## ", text, flags=re.M)
    for section in sections:
        title, _, body = section.partition("\n")
        if not title.startswith(PREFIX):
            continue
        iface = short(title.split()[0])
        for line in body.splitlines():
            if not line.startswith("| "):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if prop := re.fullmatch(r"property `(\w+)`", cells[0]):
                api.add(Member("property", iface, prop[1], type=cells[1].strip("`"),
                               const=bool(re.search(r"\bconst\b", cells[2]))))  # fmt: skip
                continue
            outs = re.search(r"`([^`]*)`", cells[1]) if len(cells) > 1 else None
            for name, ins in re.findall(r"`(\w+)\(([^)]*)\)`", cells[0]):
                api.add(Member("method", iface, name, parse_args(ins),
                               parse_args(outs[1]) if outs else ()))  # fmt: skip
        # The Job section is prose: "Properties: `Name t` (const …), …", "Method `X()`",
        # "Signal `Y(…)`".
        props = re.search(r"^Properties:(.*?)^Method ", body, flags=re.M | re.S)
        if props:
            for name, sig, const in re.findall(r"`(\w+) ([^`\s]+)`(\s*\(const)?", props[1]):
                api.add(Member("property", iface, name, type=sig, const=bool(const)))
        for name, ins in re.findall(r"^Method `(\w+)\(([^)]*)\)`", body, flags=re.M):
            api.add(Member("method", iface, name, parse_args(ins)))
        for name, args in re.findall(r"^Signal `(\w+)\(([^)]*)\)`", body, flags=re.M):
            api.add(Member("signal", iface, name, outs=parse_args(args)))
    # Authorization: "| `org.neuronos.neuron1.<action>` | covers | default |"
    for action, covers in re.findall(r"^\| `org\.neuronos\.neuron1\.([\w-]+)` \| ([^|]+)\|", text,
                                     flags=re.M):  # fmt: skip
        api.actions[action] = [m[1] for m in re.finditer(r"(?:^|,)\s*([\w.]+)", covers)]
    reads = re.search(r"^Reads \(([^)]*)\)", text, flags=re.M)
    if reads:
        api.reads = set(re.findall(r"`(\w+)`", reads[1]))
        # A bare interface name (", Hardware)") makes every method of it a read.
        interfaces = {m.iface for m in api.members.values()}
        api.reads |= set(re.findall(r"\b(\w+)\b", reads[1])) & interfaces
    return api


@pytest.fixture(scope="module")
def api() -> Api:
    if not API_MD.is_file():
        pytest.fail(
            f"API.md not found at {API_MD}: the shared/ directory must sit beside the "
            f"repository ({REPO_ROOT.parent}/shared/API.md)"
        )
    return parse_api(API_MD.read_text())


# ---- the file and the spec module ---------------------------------------------------------


def test_file_equals_spec_output() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "neurond.bus.spec"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == XML_FILE.read_text(), (
        "dbus/org.neuronos.Neuron1.xml is stale: regenerate it with "
        "`python -m neurond.bus.spec > dbus/org.neuronos.Neuron1.xml`"
    )


def test_file_holds_only_neurond_interfaces() -> None:
    names = set(file_interfaces())
    assert names, "no interfaces in the file"
    assert all(n.startswith(PREFIX) for n in names), names
    # Nothing is exported as a stub: an interface in the file has at least one member.
    for name, el in file_interfaces().items():
        c = canonical(el)
        assert c["methods"] or c["properties"] or c["signals"], f"{name} is empty"


# ---- the live daemon ------------------------------------------------------------------------


async def shutdown_job(client: Client) -> str:
    (job,) = await client.call(TEST_PATH, VM, "Shutdown", "a{sv}", [{}])
    assert isinstance(job, str) and job.startswith(f"{ROOT}/job/"), job
    return job


@pytest.mark.parametrize("kind", ["manager", "vm", "job"])
async def test_live_introspection_equals_the_file(
    kind: str, daemon: Daemon, client: Client
) -> None:
    path = {"manager": MANAGER_PATH, "vm": TEST_PATH}.get(kind) or await shutdown_job(client)
    wanted = {"manager": {MANAGER, HARDWARE}, "vm": {VM}, "job": {JOB}}[kind]
    from_file = {n: el for n, el in file_interfaces().items() if n in wanted}
    assert from_file, f"the file has none of {wanted}"

    live = {n: el for n, el in interfaces(await introspect(client, path)).items()
            if n.startswith(PREFIX)}  # fmt: skip
    assert set(live) == set(from_file), f"{path}: live {sorted(live)}, file {sorted(from_file)}"
    for name, el in from_file.items():
        assert canonical(live[name]) == canonical(el), f"{name} at {path} differs from the file"


STANDARD: dict[str, dict[str, tuple[str, str]]] = {
    # interface → member → (in signature, out signature); signals as ("", args)
    "org.freedesktop.DBus.Properties": {
        "Get": ("ss", "v"), "GetAll": ("s", "a{sv}"), "Set": ("ssv", ""),
        "PropertiesChanged": ("", "sa{sv}as"),
    },
    "org.freedesktop.DBus.Introspectable": {"Introspect": ("", "s")},
    "org.freedesktop.DBus.Peer": {"Ping": ("", ""), "GetMachineId": ("", "s")},
    "org.freedesktop.DBus.ObjectManager": {
        "GetManagedObjects": ("", "a{oa{sa{sv}}}"),
        "InterfacesAdded": ("", "oa{sa{sv}}"), "InterfacesRemoved": ("", "oas"),
    },
}  # fmt: skip


def signatures(el: ET.Element) -> dict[str, tuple[str, str]]:
    out = {}
    for m in el.findall("method"):
        args = m.findall("arg")
        out[m.get("name", "")] = (
            "".join(a.get("type", "") for a in args if a.get("direction", "in") == "in"),
            "".join(a.get("type", "") for a in args if a.get("direction") == "out"),
        )
    for s in el.findall("signal"):
        out[s.get("name", "")] = ("", "".join(a.get("type", "") for a in s.findall("arg")))
    return out


async def test_standard_interfaces_are_described_in_full(daemon: Daemon, client: Client) -> None:
    """An interface the introspection lists must show its members: busctl introspect, d-spy and
    qdbus show what the data says, and an empty org.freedesktop.DBus.Properties says "none"."""
    problems = []
    for path in (ROOT, MANAGER_PATH, TEST_PATH):
        for name, el in interfaces(await introspect(client, path)).items():
            if name in STANDARD and signatures(el) != STANDARD[name]:
                problems.append(f"{path} {name}: {signatures(el) or 'no members'}")
    assert not problems, "\n".join(problems)


async def test_object_tree_can_be_walked(daemon: Daemon, client: Client) -> None:
    """busctl tree and d-spy walk child nodes from /; the root object is the ObjectManager only."""
    vm_node = TEST_PATH.rsplit("/", 1)[1]
    walk = [("/", "org"), ("/org", "neuronos"), ("/org/neuronos", "Neuron1"),
            (ROOT, "Manager"), (ROOT, "vm"), (f"{ROOT}/vm", vm_node)]  # fmt: skip
    for path, child in walk:
        nodes = [n.get("name") for n in (await introspect(client, path)).findall("node")]
        assert child in nodes, f"{path} lists children {nodes}, not {child}"
    root_ifaces = set(interfaces(await introspect(client, ROOT)))
    assert root_ifaces - set(STANDARD) == set(), root_ifaces
    assert "org.freedesktop.DBus.ObjectManager" in root_ifaces


# ---- API.md ---------------------------------------------------------------------------------


def test_api_md_is_parsed(api: Api) -> None:
    """The parser finds what is certainly there (else the comparisons below prove nothing)."""
    for kind, key in [
        ("method", "Manager.ListVMs"), ("method", "Manager.CreateVM"), ("method", "VM.Reboot"),
        ("method", "VM.Reset"), ("method", "VM.GuestExec"), ("method", "Hardware.ListGPUs"),
        ("method", "Job.Cancel"), ("signal", "Job.Completed"), ("property", "VM.State"),
        ("property", "Job.ErrorMessage"), ("property", "Manager.Features"),
    ]:  # fmt: skip
        assert api.find(kind, key), f"API.md parser found no {kind} {key}"
    assert api.find("method", "VM.GuestExec").outs == (  # type: ignore[union-attr]
        ("i", "exit_code"),
        ("ay", "stdout"),
        ("ay", "stderr"),
    )
    assert api.find("property", "Job.StartTime").const  # type: ignore[union-attr]
    assert "vm-lifecycle" in api.actions and "Start" in api.actions["vm-lifecycle"]
    assert {"ListVMs", "GetManagedObjects"} <= api.reads


def xml_members() -> list[tuple[str, str, ET.Element]]:
    """(kind, Iface.Name, element) for every member of the file."""
    out = []
    for name, iface in file_interfaces().items():
        for tag in ("method", "property", "signal"):
            for el in iface.findall(tag):
                out.append((tag, f"{short(name)}.{el.get('name')}", el))
    return out


def test_every_member_of_the_file_is_in_api_md_as_written(api: Api) -> None:
    problems = []
    for kind, key, el in xml_members():
        member = api.find(kind, key)
        if member is None and key in spec.ADDITIONS:
            continue  # added under API.md's Compatibility rule: test_additions_are_honest
        if member is None:
            problems.append(f"{kind} {key} is not in API.md")
            continue
        args = [(a.get("type", ""), a.get("name", ""), a.get("direction", "in"))
                for a in el.findall("arg")]  # fmt: skip
        if kind == "method":
            ins = tuple((t, n) for t, n, d in args if d == "in")
            outs = tuple((t, n) for t, n, d in args if d == "out")
            if (ins, outs) != (member.ins, member.outs):
                problems.append(f"{key}: file ({ins} → {outs}), API.md "
                                f"({member.ins} → {member.outs})")  # fmt: skip
        elif kind == "signal":
            if tuple((t, n) for t, n, _ in args) != member.outs:
                problems.append(f"signal {key}: file {args}, API.md {member.outs}")
        elif el.get("type") != member.type:
            problems.append(f"property {key}: file {el.get('type')}, API.md {member.type}")
    assert not problems, "\n".join(problems)


def test_api_md_members_are_in_the_file_or_not_yet_implemented(api: Api) -> None:
    in_file = {key for _, key, _ in xml_members()}
    missing = sorted(
        f"{m.kind} {m.key}" for m in api.members.values()
        if m.key not in in_file and m.key not in spec.NOT_YET_IMPLEMENTED
    )  # fmt: skip
    assert not missing, f"in API.md, neither exported nor listed as not yet implemented: {missing}"


def test_additions_are_honest(api: Api) -> None:
    """ADDITIONS are exported members API.md lacks, each with the APIVersion that added it."""
    in_file = {key for _, key, _ in xml_members()}
    assert set(spec.ADDITIONS) <= in_file, sorted(set(spec.ADDITIONS) - in_file)
    in_api = sorted(k for k in spec.ADDITIONS if any(m.key == k for m in api.members.values()))
    assert not in_api, f"in API.md now, so remove them from ADDITIONS: {in_api}"
    assert all(1 < v <= spec.API_VERSION for v in spec.ADDITIONS.values()), spec.ADDITIONS


def test_not_yet_implemented_is_really_absent(api: Api) -> None:
    nyi = list(spec.NOT_YET_IMPLEMENTED)
    assert len(nyi) == len(set(nyi)), nyi
    in_file = {key for _, key, _ in xml_members()}
    exported = sorted(set(nyi) & in_file)
    assert not exported, f"exported, so remove them from NOT_YET_IMPLEMENTED: {exported}"
    api_keys = {m.key for m in api.members.values()}
    unknown = sorted(set(nyi) - api_keys)
    assert not unknown, f"NOT_YET_IMPLEMENTED names members API.md does not have: {unknown}"


# ---- annotations ----------------------------------------------------------------------------


def all_args() -> list[tuple[str, ET.Element]]:
    out = []
    for kind, key, el in xml_members():
        if kind != "property":
            out.extend((f"{kind} {key}", a) for a in el.findall("arg"))
    return out


def test_every_argument_has_a_unique_name() -> None:
    problems = []
    for kind, key, el in xml_members():
        names = [a.get("name") for a in el.findall("arg")]
        if not all(names) or len(names) != len(set(names)):
            problems.append(f"{kind} {key}: argument names {names}")
    assert not problems, "\n".join(problems)


def test_ay_arguments_force_gvariant() -> None:
    bare = [f"{where} {a.get('name')}" for where, a in all_args()
            if a.get("type") == "ay" and annotations(a).get(FORCE_GVARIANT) != "true"]  # fmt: skip
    assert not bare, f"ay arguments without {FORCE_GVARIANT}: {bare}"


def test_qtdbus_type_names_for_struct_outputs() -> None:
    """QtDBus cannot map structs or lists of dicts by itself: API.md asks for Out0 when the first
    output is a(ssos) or aa{sv}; qdbusxml2cpp needs Out<N> for every such output."""
    problems = []
    for kind, key, el in xml_members():
        if kind != "method":
            continue
        outs = [a for a in el.findall("arg") if a.get("direction") == "out"]
        for i, arg in enumerate(outs):
            t = arg.get("type", "")
            if ("(" in t or t == "aa{sv}") and not annotations(el).get(f"{QT_OUT}{i}"):
                problems.append(f"{key}: output {i} ({t}) has no {QT_OUT}{i}")
    assert not problems, "\n".join(problems)
    list_vms = file_interfaces()[MANAGER].find("method[@name='ListVMs']")
    assert list_vms is not None and annotations(list_vms).get(QT_OUT + "0")


def test_const_properties_and_changed_signals(api: Api) -> None:
    const, problems = set(), []
    for kind, key, el in xml_members():
        if kind != "property":
            continue
        emits = annotations(el).get(EMITS, "true")
        if emits == "const":
            const.add(key)
        elif emits != "true":  # never invalidated-only, never silent
            problems.append(f"{key}: {EMITS}={emits}")
        if el.get("access") != "read":  # API.md has no writable property
            problems.append(f"{key}: access {el.get('access')}")
    assert not problems, "\n".join(problems)
    implemented = {key for kind, key, _ in xml_members() if kind == "property"}
    assert const == CONST_PROPERTIES & implemented, const
    api_const = {m.key for m in api.members.values() if m.kind == "property" and m.const}
    assert const == api_const & implemented, (const, api_const)


# ---- authorization --------------------------------------------------------------------------


def test_every_method_is_a_read_or_has_an_action(api: Api) -> None:
    problems = []
    for name, iface in file_interfaces().items():
        for m in iface.findall("method"):
            pair = (name, m.get("name", ""))
            if (pair in ACTIONS) == (pair in READS):
                problems.append(f"{pair}: in ACTIONS {pair in ACTIONS}, in READS {pair in READS}")
    known = {(i.name, m.name) for i in spec.INTERFACES.values() for m in i.methods}
    for pair in [*ACTIONS, *READS]:
        if pair not in known:
            problems.append(f"{pair} is in ACTIONS/READS but not exported")
    # The mapping is API.md's: each method under the action whose "covers" names it.
    for (iface, method), action in ACTIONS.items():
        covered = api.actions.get(action)
        label = f"{short(iface)}.{method}"
        if covered is None:
            problems.append(f"{label}: action {action} is not in API.md")
        elif label in spec.ADDITIONS:
            continue  # API.md cannot cover it yet; the action is one of API.md's
        elif method not in covered and label not in covered:
            problems.append(f"{label}: API.md's {action} covers {covered}")
    for iface, method in READS:
        if method not in api.reads and short(iface) not in api.reads:
            problems.append(f"{method} is treated as a read; API.md's reads are {api.reads}")
    assert not problems, "\n".join(problems)
