"""The D-Bus object tree and call dispatch, on dbus-fast's low-level message API.

neurond does not use dbus-fast's ServiceInterface: its handlers cannot see the caller or the
message flags (needed for authorization), it turns exceptions into a generic error, sends
InterfacesAdded from the wrong path and answers vanished paths with UnknownMethod. One message
handler here owns every call to our tree instead: it checks the signature against the spec,
runs the handler as a task with the call timeout and the per-sender limit, and translates every
failure into a typed error reply, once.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Node

from neurond import faults, log, messages
from neurond.bus.auth import InteractiveAuthorizationRequired, interactive_allowed
from neurond.bus.spec import OBJECT_MANAGER, ROOT
from neurond.errors import (
    CancelledError,
    InternalError,
    LimitExceededError,
    NeuronError,
    PermissionDeniedError,
    TimeoutError_,
)

_log = logging.getLogger("neurond.bus")

PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"
# Full definitions of the standard interfaces every path serves (ObjectManager: root only).
_STANDARD = [i for i in Node.default().interfaces if i.name != OBJECT_MANAGER]
_DBUS_ERR = "org.freedesktop.DBus.Error."
_INTERACTIVE_REQUIRED = _DBUS_ERR + "InteractiveAuthorizationRequired"
INTERACTIVE_EXTRA_S = 300  # how long a person may take in a polkit dialog


class BusError(Exception):
    """A bus-level error (org.freedesktop.DBus.Error.*): unknown object, method, bad args."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = _DBUS_ERR + name
        self.text = text


@dataclass(frozen=True)
class Call:
    """What a handler knows about the call: the message and its sender."""

    msg: Message
    path: str

    @property
    def sender(self) -> str:
        return self.msg.sender or ""


Handler = Callable[..., Awaitable[Any]]


@dataclass
class Exported:
    """One interface on one object: its spec, its property values and its method handlers."""

    spec: Interface
    properties: Callable[[], dict[str, Any]]
    methods: dict[str, Handler] = field(default_factory=dict)
    # The last values read and their Variants: GetManagedObjects reads every object, most of
    # which did not change since the previous read; equal values reuse the built Variants
    # (docs/benchmarks.md: building them was the largest share of the call at 1,000 VMs).
    _last: tuple[dict[str, Any], dict[str, Variant]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def variants(self) -> dict[str, Variant]:
        values = self.properties()
        last = self._last
        if last is not None and last[0] == values:
            return last[1]
        built = {p.name: Variant(p.signature, values[p.name]) for p in self.spec.properties}
        self._last = (values, built)
        return built


class Router:
    """Owns the exported objects and every call to them."""

    def __init__(self, bus: MessageBus, call_timeout: float, calls_per_sender: int) -> None:
        self.bus = bus
        self.call_timeout = call_timeout
        self.calls_per_sender = calls_per_sender
        self.objects: dict[str, dict[str, Exported]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._per_sender: dict[str, int] = {}
        self.accepting = True
        # False until the daemon owns its name: objects found before then are not announced
        # (clients read them with GetManagedObjects once the name appears).
        self.live = False
        # Set by the daemon to the authorizer's uid lookup (cached per sender).
        self.caller_uid: Callable[[str], Awaitable[int]] | None = None
        bus.add_message_handler(self._on_message)

    # ---- the tree -----------------------------------------------------------------------

    def add(self, path: str, interfaces: list[Exported]) -> None:
        self.objects[path] = {e.spec.name: e for e in interfaces}
        if self.live:
            body = {e.spec.name: e.variants() for e in interfaces}
            self.signal(ROOT, OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}", [path, body])

    def remove(self, path: str) -> None:
        ifaces = self.objects.pop(path, None)
        if ifaces is not None and self.live:
            self.signal(ROOT, OBJECT_MANAGER, "InterfacesRemoved", "oas", [path, list(ifaces)])

    def properties_changed(self, path: str, interface: str, changed: dict[str, Any]) -> None:
        exported = self.objects.get(path, {}).get(interface)
        if exported is None or not changed or not self.live:
            return
        sigs = {p.name: p.signature for p in exported.spec.properties}
        body = {k: Variant(sigs[k], v) for k, v in changed.items()}
        self.signal(path, PROPERTIES, "PropertiesChanged", "sa{sv}as", [interface, body, []])

    def signal(
        self, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> None:
        self.bus.send(Message.new_signal(path, interface, member, signature, body))

    def managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        return {
            path: {name: e.variants() for name, e in ifaces.items()}
            for path, ifaces in self.objects.items()
            if path != ROOT
        }

    # ---- dispatch -----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL:
            return False
        path = msg.path or ""
        if not (path == ROOT or path.startswith(ROOT + "/") or ROOT.startswith(path)):
            return False  # not ours: dbus-fast answers (UnknownObject/standard interfaces)
        sender = msg.sender or ""
        if self._per_sender.get(sender, 0) >= self.calls_per_sender:
            self._reply_error(
                msg,
                LimitExceededError(
                    f"Too many calls in flight from {sender} (at most {self.calls_per_sender}).",
                    details={"limit": self.calls_per_sender},
                ),
            )
            return True
        self._per_sender[sender] = self._per_sender.get(sender, 0) + 1
        task = asyncio.ensure_future(self._process(msg))
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            left = self._per_sender.get(sender, 1) - 1
            if left > 0:
                self._per_sender[sender] = left
            else:
                self._per_sender.pop(sender, None)

        task.add_done_callback(done)
        return True

    async def _uid(self, sender: str) -> int | None:
        """The caller's uid for the log context; None when the bus cannot tell."""
        if self.caller_uid is None or not sender:
            return None
        try:
            # asyncio.timeout, not wait_for: the uid is almost always cached, and wait_for
            # would wrap every call's lookup in a task of its own (docs/benchmarks.md).
            async with asyncio.timeout(self.call_timeout):
                return await self.caller_uid(sender)
        except (NeuronError, TimeoutError):
            return None

    async def _process(self, msg: Message) -> None:
        method = f"{msg.interface}.{msg.member}"
        uid = await self._uid(msg.sender or "")
        with log.bind(sender=msg.sender, uid=uid, method=method):
            try:
                if not self.accepting:
                    raise CancelledError("neurond is stopping; call again once it is back.")
                interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
                interactive_allowed.set(interactive)
                # API.md: the call bound, plus the time a person spends in a polkit dialog.
                timeout = self.call_timeout + (INTERACTIVE_EXTRA_S if interactive else 0)
                signature, body = await asyncio.wait_for(self._dispatch(msg), timeout)
                reply = Message.new_method_return(msg, signature, body)
            except NeuronError as e:
                self._reply_error(msg, e)
                return
            except BusError as e:
                reply = Message.new_error(msg, e.name, e.text)
            except InteractiveAuthorizationRequired as e:
                _log.info("%s needs interactive authorization", method)
                reply = Message.new_error(msg, _INTERACTIVE_REQUIRED, str(e))
            except TimeoutError:
                self._reply_error(
                    msg,
                    TimeoutError_(
                        f"{msg.member} did not finish within {self.call_timeout:g} s.",
                        details={"timeout_s": self.call_timeout},
                    ),
                )
                return
            except asyncio.CancelledError:
                self._reply_error(
                    msg, CancelledError(f"{msg.member} was cancelled because neurond is stopping.")
                )
                return
            except Exception as e:  # noqa: BLE001 - the caller gets Internal, the journal gets the traceback
                _log.error("Unexpected failure in %s", method, exc_info=True)
                self._reply_error(
                    msg,
                    InternalError(
                        f"{msg.member} failed because of an internal error in neurond; "
                        "the system journal has the details.",
                        cause=e,
                    ),
                    logged=True,
                )
                return
            self._send_reply(msg, reply)

    def _reply_error(self, msg: Message, err: NeuronError, logged: bool = False) -> None:
        if not logged:
            denied = isinstance(err, PermissionDeniedError)
            log.log_error(
                _log,
                err,
                f"{msg.member} failed: {err.message}",
                fields={"MESSAGE_ID": messages.AUTHORIZATION_DENIED} if denied else None,
            )
        self._send_reply(msg, Message.new_error(msg, err.dbus_name(), err.message))

    def _send_reply(self, msg: Message, reply: Message) -> None:
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    async def _dispatch(self, msg: Message) -> tuple[str, list[Any]]:
        path, iface, member = msg.path or "", msg.interface or "", msg.member or ""
        if iface == INTROSPECTABLE and member == "Introspect" and msg.signature == "":
            return "s", [self.introspect(path)]
        if iface == PEER:
            return self._peer(msg)
        ifaces = self.objects.get(path)
        if ifaces is None:
            raise BusError("UnknownObject", f"No object at {path}.")
        if iface == PROPERTIES:
            return self._properties(msg, ifaces)
        exported = (
            ifaces.get(iface)
            if iface
            else next(
                (e for e in ifaces.values() if any(m.name == member for m in e.spec.methods)), None
            )
        )
        if exported is None:
            raise BusError("UnknownInterface", f"{path} has no interface {iface}.")
        spec = next((m for m in exported.spec.methods if m.name == member), None)
        handler = exported.methods.get(member)
        if spec is None or handler is None:
            raise BusError("UnknownMethod", f"{exported.spec.name} has no method {member}.")
        if msg.signature != spec.in_signature:
            raise BusError(
                "InvalidArgs", f"{member} takes ({spec.in_signature}), not ({msg.signature})."
            )
        await faults.ahit(f"bus.{member}")
        result = await handler(Call(msg, path), *msg.body)
        if spec.out_signature == "":
            return "", []
        if len(spec.out_args) == 1:
            result = [result]
        return spec.out_signature, list(result)

    def _peer(self, msg: Message) -> tuple[str, list[Any]]:
        if msg.member == "Ping" and msg.signature == "":
            return "", []
        if msg.member == "GetMachineId" and msg.signature == "":
            try:
                with open("/etc/machine-id") as f:
                    return "s", [f.read().strip()]
            except OSError:
                raise BusError("Failed", "This machine has no machine ID.") from None
        raise BusError("UnknownMethod", f"{PEER} has no method {msg.member}({msg.signature}).")

    def _properties(self, msg: Message, ifaces: dict[str, Exported]) -> tuple[str, list[Any]]:
        member, sig, body = msg.member, msg.signature, msg.body
        if member == "GetAll" and sig == "s":
            exported = ifaces.get(body[0])
            return "a{sv}", [exported.variants() if exported else {}]
        if member in ("Get", "Set") and sig == ("ss" if member == "Get" else "ssv"):
            exported = ifaces.get(body[0])
            if exported is None:
                raise BusError("UnknownInterface", f"No interface {body[0]} here.")
            prop = next((p for p in exported.spec.properties if p.name == body[1]), None)
            if prop is None:
                raise BusError("UnknownProperty", f"{body[0]} has no property {body[1]}.")
            if member == "Set":
                raise BusError("PropertyReadOnly", f"{body[1]} is read-only.")
            return "v", [Variant(prop.signature, exported.properties()[prop.name])]
        raise BusError(
            "UnknownMethod" if member not in ("Get", "GetAll", "Set") else "InvalidArgs",
            f"{PROPERTIES}.{member}({sig}) is not a valid call.",
        )

    def introspect(self, path: str) -> str:
        node = ET.Element("node")
        for iface in _STANDARD:
            node.append(iface.to_xml())
        for exported in self.objects.get(path, {}).values():
            node.append(exported.spec.to_xml())
        prefix = path.rstrip("/") + "/"
        children = sorted(
            {p[len(prefix) :].split("/")[0] for p in self.objects if p.startswith(prefix)}
        )
        for child in children:
            ET.SubElement(node, "node", {"name": child})
        return ET.tostring(node, encoding="unicode")

    async def drain(self, timeout: float) -> None:
        """Stop taking calls; let those in flight finish (bounded), then cancel the rest."""
        self.accepting = False
        pending = list(self.tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
