"""The pre-marshalled GetManagedObjects reply (neurond/bus/router.py) is byte for byte what
dbus-fast's own marshaller makes of the same objects: for 0 to 9 objects of varying sizes
(every padding case of the last entry), after a value changes, an object goes, one comes.
The bus-level behaviour is tested in tests/bus/test_managed_objects.py.
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.introspection import Interface, Property

from neurond.bus.router import Exported, Router
from neurond.bus.spec import ROOT


class _NoBus:
    """Router only registers its message handler on the bus when built."""

    def add_message_handler(self, handler: Any) -> None:
        pass


def _iface(name: str, props: dict[str, str]) -> Interface:
    spec = Interface(name)
    spec.properties = [Property(k, sig) for k, sig in props.items()]
    return spec


VM = _iface("org.example.VM", {"Name": "s", "N": "u", "On": "b", "Tags": "as"})
EXTRA = _iface("org.example.Extra", {"Size": "t"})
EMPTY = _iface("org.example.Empty", {})
CALL = Message(destination="org.example", path=ROOT, interface="i.f", member="M", serial=7)
CALL.sender = ":1.42"


def reference(router: Router) -> bytes:
    objects = {
        path: {
            name: {p.name: Variant(p.signature, e.properties()[p.name]) for p in e.spec.properties}
            for name, e in ifaces.items()
        }
        for path, ifaces in router.objects.items()
        if path != ROOT
    }
    msg = Message.new_method_return(CALL, "a{oa{sa{sv}}}", [objects])
    msg.serial = 3
    return bytes(msg._marshall(False))


def ours(router: Router) -> bytes:
    msg = router.managed_objects(CALL)
    msg.serial = 3
    return bytes(msg._marshall(False))


def test_bytes_equal_dbus_fasts_own_marshalling() -> None:
    values: dict[int, int] = {}

    def props(i: int) -> Any:
        return lambda: {"Name": "x" * i, "N": values.get(i, i), "On": i % 2 == 0, "Tags": ["t"] * i}

    router = Router(_NoBus(), 5.0, 10)  # type: ignore[arg-type]
    router.add(ROOT, [Exported(EMPTY, dict)])
    assert ours(router) == reference(router)  # no objects: an empty array
    router.add(f"{ROOT}/m", [Exported(VM, props(0)), Exported(EXTRA, lambda: {"Size": 5}),
                             Exported(EMPTY, dict)])  # fmt: skip
    for i in range(1, 10):
        router.add(f"{ROOT}/vm/{'v' * i}", [Exported(VM, props(i))])
        assert ours(router) == reference(router), i
        assert ours(router) == reference(router), i  # now from the cache
    values[4] = 99
    assert ours(router) == reference(router)
    router.remove(f"{ROOT}/vm/vvv")
    assert ours(router) == reference(router)
    router.add(f"{ROOT}/vm/vvv", [Exported(VM, props(11))])
    assert ours(router) == reference(router)


def test_a_signalled_object_is_read_again_after_properties_changed() -> None:
    value = {"Name": "a", "N": 1, "On": True, "Tags": []}
    router = Router(_NoBus(), 5.0, 10)  # type: ignore[arg-type]
    router.add(f"{ROOT}/vm/a", [Exported(VM, lambda: dict(value), signalled=True)])
    router.add(f"{ROOT}/job/1", [Exported(EXTRA, lambda: {"Size": value["N"]})])
    before = ours(router)
    assert before == reference(router)
    value["N"] = 2  # the job (not signalled) is read on every call; the VM waits for its signal
    assert ours(router) != before
    router.properties_changed(f"{ROOT}/vm/a", VM.name, {"N": 2})
    assert ours(router) == reference(router)
