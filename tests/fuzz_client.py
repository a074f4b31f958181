"""A fuzzing D-Bus client, run as a subprocess by tests/bus/test_fuzz.py.

``python -m tests.fuzz_client UID EXAMPLES SEED``: imports everything, drops to UID (so the bus
sees an unprivileged caller; the venv under /root cannot be started as another user), reads
neurond's live introspection, and drives every exported method with hypothesis-generated
values of the right signature and of wrong ones. Prints one line per distinct reply kind:
``ok``, or the error name, with the first message seen for it. Exit 0 when it ran.
"""

from __future__ import annotations

import asyncio
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.signature import SignatureType, get_signature_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NAME = "org.neuronos.Neuron1"
ROOT = "/org/neuronos/Neuron1"
WRONG_SIGNATURES = ["", "s", "i", "as", "a{sv}", "ss", "b", "ay", "o", "x"]

_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "../..", "/etc/passwd", "$(reboot)", "0000:01:00.0/../..", "test"]),
    st.integers(1, 200_000).map(lambda n: "x" * n),
).map(lambda s: s.replace("\0", ""))  # a D-Bus string cannot hold NUL: the library refuses
_path = st.sampled_from(["/", ROOT, f"{ROOT}/vm/x", "/a/b_c"])

INTS = {
    "y": (0, 255), "n": (-(2**15), 2**15 - 1), "q": (0, 2**16 - 1), "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1), "x": (-(2**63), 2**63 - 1), "t": (0, 2**64 - 1),
}  # fmt: skip


def value(t: SignatureType) -> st.SearchStrategy[Any]:
    """A strategy for any value of D-Bus type ``t``."""
    tok = t.token
    if tok in INTS:
        lo, hi = INTS[tok]
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0]))
    if tok == "b":
        return st.booleans()
    if tok == "d":
        return st.floats(allow_nan=True)
    if tok == "s":
        return _text
    if tok == "o":
        return _path
    if tok == "g":
        return st.sampled_from(["", "s", "a{sv}"])
    if tok == "v":
        return st.one_of(
            st.builds(lambda v: Variant("s", v), _text),
            st.builds(lambda v: Variant("u", v), st.integers(0, 2**32 - 1)),
            st.builds(lambda v: Variant("i", v), st.integers(-(2**31), 2**31 - 1)),
            st.builds(lambda v: Variant("b", v), st.booleans()),
            st.builds(lambda v: Variant("ay", v), st.binary(max_size=64)),
        )
    if tok == "a":
        child = t.children[0]
        if child.token == "{":
            key, val = child.children
            if key.token == "s" and val.token == "v":
                keys = st.one_of(
                    st.sampled_from(["paused", "force", "timeout_s", "name", "sha256", "stdin"]),
                    _text,
                )
                return st.dictionaries(keys, value(val), max_size=6)
            return st.dictionaries(value(key), value(val), max_size=4)
        if child.token == "y":
            return st.binary(max_size=4096)
        return st.lists(value(child), max_size=5)
    if tok == "(":
        return st.tuples(*(value(c) for c in t.children)).map(list)
    raise ValueError(f"no strategy for {t.signature}")


def body(signature: str) -> st.SearchStrategy[list[Any]]:
    types = get_signature_tree(signature).types
    return st.tuples(*(value(t) for t in types)).map(list) if types else st.just([])


async def methods(bus: MessageBus) -> list[tuple[str, str, str, str]]:
    """(path, interface, method, in-signature) for every neurond method, from introspection."""
    out = []
    paths = [f"{ROOT}/Manager", ROOT]
    reply = await call(
        bus,
        Message(
            destination=NAME, path=f"{ROOT}/Manager", interface=f"{NAME}.Manager", member="ListVMs"
        ),
    )
    paths += (
        [row[2] for row in reply.body[0]] if reply.message_type is MessageType.METHOD_RETURN else []
    )
    for path in paths:
        xml = await call(
            bus,
            Message(
                destination=NAME,
                path=path,
                interface="org.freedesktop.DBus.Introspectable",
                member="Introspect",
            ),
        )
        for iface in ET.fromstring(xml.body[0]).iter("interface"):
            if not iface.get("name", "").startswith(NAME) and "ObjectManager" not in iface.get(
                "name", ""
            ):
                continue
            for m in iface.iter("method"):
                sig = "".join(
                    a.get("type", "") for a in m.iter("arg") if a.get("direction", "in") == "in"
                )
                out.append((path, iface.get("name", ""), m.get("name", ""), sig))
    return out


async def call(bus: MessageBus, msg: Message) -> Message:
    reply = await asyncio.wait_for(bus.call(msg), 60)
    assert reply is not None
    return reply


async def connect() -> MessageBus:
    return await MessageBus(bus_type=BusType.SYSTEM).connect()  # DBUS_SYSTEM_BUS_ADDRESS


def main() -> None:
    uid, examples, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if uid:
        os.setgid(uid)
        os.setgroups([])
        os.setuid(uid)
    loop = asyncio.new_event_loop()
    bus = loop.run_until_complete(connect())
    targets = loop.run_until_complete(methods(bus))
    seen: dict[str, str] = {}

    def record(reply: Message) -> None:
        if reply.message_type is MessageType.ERROR:
            key = reply.error_name or "?"
            text = reply.body[0] if reply.signature == "s" else f"<body {reply.signature}>"
        else:
            key, text = "ok", ""
        seen.setdefault(key, text.replace("\n", "\\n")[:300])

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        path, iface, member, sig = data.draw(st.sampled_from(targets))
        if data.draw(st.integers(0, 4)) == 0:  # sometimes a wrong signature
            sig = data.draw(st.sampled_from(WRONG_SIGNATURES))
        args = data.draw(body(sig))
        msg = Message(
            destination=NAME, path=path, interface=iface, member=member, signature=sig, body=args
        )
        record(loop.run_until_complete(call(bus, msg)))

    fuzz_seeded = __import__("hypothesis").seed(seed)(fuzz)
    fuzz_seeded()
    print(f"targets {len(targets)}")
    for key, text in sorted(seen.items()):
        print(f"{key}\t{text}")


if __name__ == "__main__":
    main()
