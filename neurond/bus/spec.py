"""The implemented part of API.md as introspection data: the one definition of what is exported.

``dbus/org.neuronos.Neuron1.xml`` is this, written out (``python -m neurond.bus.spec``);
a test compares it with the live daemon's introspection.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

from dbus_fast.constants import ArgDirection
from dbus_fast.constants import PropertyAccess as Access
from dbus_fast.introspection import Arg, Interface, Method, Property, Signal

from neurond.bus.docs import DOCS

PREFIX = "org.neuronos.Neuron1"
ROOT = "/org/neuronos/Neuron1"
MANAGER_PATH = f"{ROOT}/Manager"
MANAGER = f"{PREFIX}.Manager"
VM = f"{PREFIX}.VM"
JOB = f"{PREFIX}.Job"
HARDWARE = f"{PREFIX}.Hardware"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
API_VERSION = 3  # 2: Rename, SetMemory, SetVCPUs; 3: Owner, media, images (issue 12; ADDITIONS)

_CONST = {"org.freedesktop.DBus.Property.EmitsChangedSignal": "const"}
_QT = "org.qtproject.QtDBus.QtTypeName.Out0"


def _args(spec: str, direction: ArgDirection) -> list[Arg]:
    """'s name, a{sv} options' → named args."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        sig, name = part.split()
        ann = {"org.gtk.GDBus.C.ForceGVariant": "true"} if sig == "ay" else None
        out.append(Arg(sig, direction, name, ann))
    return out


def _method(name: str, ins: str = "", outs: str = "", qt: str | None = None) -> Method:
    return Method(
        name, _args(ins, ArgDirection.IN), _args(outs, ArgDirection.OUT), {_QT: qt} if qt else None
    )


def _prop(name: str, sig: str, const: bool = False) -> Property:
    return Property(name, sig, Access.READ, dict(_CONST) if const else None)


MANAGER_IFACE = Interface(
    MANAGER,
    methods=[
        _method("ListVMs", outs="a(ssos) vms", qt="QList<NeuronVMEntry>"),
        _method("GetVM", "s name_or_uuid", "o vm"),
        _method("CreateVM", "a{sv} spec", "o vm, o job"),
        _method("DownloadImage", "s url, a{sv} options", "o job"),
        _method("ListJobs", outs="ao jobs"),
        _method("ListErrors", outs="a(ssbu) errors", qt="QList<NeuronErrorEntry>"),
        _method("ListImages", outs="aa{sv} images", qt="QList<QVariantMap>"),
        _method("DeleteImage", "s name"),
    ],
    properties=[
        _prop("APIVersion", "u"),
        _prop("Version", "s"),
        _prop("LibvirtURI", "s"),
        _prop("Connected", "b"),
        _prop("Features", "as"),
    ],
)

HARDWARE_IFACE = Interface(
    HARDWARE,
    methods=[
        _method("GetIOMMUStatus", outs="a{sv} status"),
        _method("ListGPUs", outs="aa{sv} gpus", qt="QList<QVariantMap>"),
        _method("CheckPassthrough", "s address", "a{sv} result"),
    ],
)

VM_IFACE = Interface(
    VM,
    methods=[
        _method("Start", "a{sv} options"),
        _method("Shutdown", "a{sv} options", "o job"),
        _method("ForceOff"),
        _method("Reboot"),
        _method("Reset"),
        _method("Pause"),
        _method("Resume"),
        _method("SetAutostart", "b enabled"),
        _method("Delete", "a{sv} options", "o job"),
        _method("GetDisplay", outs="a{sv} display"),
        _method("GuestPing"),
        _method("GuestInfo", outs="a{sv} info"),
        _method("GuestExec", "s path, as args, a{sv} options", "i exit_code, ay stdout, ay stderr"),
        _method("Rename", "s new_name"),
        _method("SetMemory", "t mib, a{sv} options"),
        _method("SetVCPUs", "u count, a{sv} options"),
        _method("ChangeMedia", "s iso"),
        _method("EjectMedia"),
    ],
    properties=[
        _prop("Name", "s"),
        _prop("UUID", "s", const=True),
        _prop("State", "s"),
        _prop("StateReason", "s"),
        _prop("Persistent", "b"),
        _prop("Autostart", "b"),
        _prop("VCPUs", "u"),
        _prop("MemoryMiB", "t"),
        _prop("GPUAddress", "s"),
        _prop("LookingGlass", "b"),
        _prop("GuestAgent", "s"),
        _prop("Owner", "u"),
        _prop("Media", "s"),
    ],
)

JOB_IFACE = Interface(
    JOB,
    methods=[_method("Cancel")],
    signals=[Signal("Completed", _args("b success, s error_name, s message", ArgDirection.OUT))],
    properties=[
        _prop("Operation", "s", const=True),
        _prop("State", "s"),
        _prop("Progress", "d"),
        _prop("ProgressValid", "b"),
        _prop("Bytes", "t"),
        _prop("TotalBytes", "t"),
        _prop("Rate", "t"),
        _prop("StartTime", "t", const=True),
        _prop("Cancelable", "b"),
        _prop("Objects", "ao"),
        _prop("StartedByUID", "u", const=True),
        _prop("ErrorName", "s"),
        _prop("ErrorMessage", "s"),
    ],
)

OBJECT_MANAGER_IFACE = Interface(
    OBJECT_MANAGER,
    methods=[_method("GetManagedObjects", outs="a{oa{sa{sv}}} objects")],
    signals=[
        Signal(
            "InterfacesAdded",
            _args("o object_path, a{sa{sv}} interfaces_and_properties", ArgDirection.OUT),
        ),
        Signal("InterfacesRemoved", _args("o object_path, as interfaces", ArgDirection.OUT)),
    ],
)

DOCSTRING = "org.gtk.GDBus.DocString"


def _document(iface: Interface) -> None:
    """Attach docs.DOCS to the interface and each member (KeyError: a member lacks its doc)."""
    short = iface.name.removeprefix(PREFIX + ".")
    iface.annotations[DOCSTRING] = DOCS[short]
    members: list[Method | Property | Signal] = [*iface.methods, *iface.properties, *iface.signals]
    for member in members:
        member.annotations[DOCSTRING] = DOCS[f"{short}.{member.name}"]


for _iface in (MANAGER_IFACE, HARDWARE_IFACE, VM_IFACE, JOB_IFACE):
    _document(_iface)

INTERFACES: dict[str, Interface] = {
    i.name: i for i in (MANAGER_IFACE, HARDWARE_IFACE, VM_IFACE, JOB_IFACE, OBJECT_MANAGER_IFACE)
}

# API.md members not exported yet; a test keeps this list honest, and it only shrinks.
NOT_YET_IMPLEMENTED: tuple[str, ...] = ()

# Members beyond API.md, added under its Compatibility rule (each raises APIVersion): issue 12.
ADDITIONS: dict[str, int] = {"VM.Rename": 2, "VM.SetMemory": 2, "VM.SetVCPUs": 2}
ADDITIONS["VM.Owner"] = 3
ADDITIONS.update({"VM.ChangeMedia": 3, "VM.EjectMedia": 3, "VM.Media": 3})
ADDITIONS.update({"Manager.ListImages": 3, "Manager.DeleteImage": 3})


def document() -> str:
    """The interface file: every neurond interface, as ``dbus/org.neuronos.Neuron1.xml``."""
    node = ET.Element("node")
    for name in (MANAGER, HARDWARE, VM, JOB):
        node.append(INTERFACES[name].to_xml())
    ET.indent(node)
    doctype = (
        '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
    )
    return doctype + ET.tostring(node, encoding="unicode") + "\n"


if __name__ == "__main__":
    sys.stdout.write(document())
