"""The D-Bus object tree and call dispatch, on dbus-fast's low-level message API.

neurond does not use dbus-fast's ServiceInterface: its handlers cannot see the caller or the
message flags (needed for authorization), it turns exceptions into a generic error, sends
InterfacesAdded from the wrong path and answers vanished paths with UnknownMethod. One message
handler here owns every call to our tree instead: it checks the signature against the spec,
runs the handler as a task with the call timeout and the per-sender limit, and translates every
failure into a typed error reply, once (``_fail``). Calls that cannot wait (Properties, and the
methods an interface declares ``immediate``) are answered in the handler itself, and
GetManagedObjects is sent pre-marshalled (``Marshalled``): docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast._private.marshaller import Marshaller
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Method, Node

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
# Flag bits as ints: enum.Flag operations cost microseconds on every call.
_NO_REPLY_EXPECTED = MessageFlag.NO_REPLY_EXPECTED.value
_ALLOW_INTERACTIVE = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION.value
_UID_CACHE = 4096  # callers' uids kept by unique name (for the log context)


MANAGED_OBJECTS = "a{oa{sa{sv}}}"
_MAX_MESSAGE = 128 * 1024 * 1024  # the D-Bus limit on a message, header and body


class Marshalled(Message):
    """A method return whose body is already in wire format (little-endian, offset 0).

    dbus-fast's writer asks every message for ``_marshall()`` when it queues it; this one
    marshals only its header (the fields dbus-fast's ``Message.new_method_return`` sets) and
    appends the body as is. The body must be aligned as if it began at offset 0: a D-Bus
    header is padded to 8 bytes, so the body always starts 8-aligned on the wire.
    """

    def __init__(self, call: Message, signature: str, body: bytes) -> None:
        super().__init__(
            message_type=MessageType.METHOD_RETURN,
            reply_serial=call.serial,
            destination=call.sender,
            signature=signature,
        )
        self.raw_body = body

    def _marshall(self, negotiate_unix_fd: bool) -> bytearray:
        fields = [(5, Variant("u", self.reply_serial))]  # REPLY_SERIAL
        if self.destination:
            fields.append((6, Variant("s", self.destination)))  # DESTINATION
        fields.append((8, Variant("g", self.signature)))  # SIGNATURE
        header = Marshaller(
            "yyyyuua(yv)",
            [ord("l"), self.message_type.value, self.flags.value, 1, len(self.raw_body),
             self.serial, fields],
        ).marshall()  # fmt: skip
        header += bytes(-len(header) % 8)
        if len(header) + len(self.raw_body) > _MAX_MESSAGE:
            raise ValueError(f"reply of {len(self.raw_body)} bytes exceeds the D-Bus limit")
        return header + self.raw_body


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
    # True when every change of a value is announced through Router.properties_changed (a
    # VM: the core's listener signals each change). Then the values are read again only after
    # such a call; otherwise on every read, and equal values keep the built Variants.
    signalled: bool = False
    # Methods whose handler never waits (reads of neurond's memory): run to their end as the
    # call arrives, without a task or a timer (unless fault hooks are set: they may wait).
    immediate: frozenset[str] = frozenset()
    # The last values read and their Variants (GetAll, GetManagedObjects, InterfacesAdded);
    # GetManagedObjects reuses an object's marshalled entry while this dict stays the same.
    _last: tuple[dict[str, Any], dict[str, Variant]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _stale: bool = field(default=True, init=False, repr=False, compare=False)

    def invalidate(self) -> None:
        self._stale = True

    def variants(self) -> dict[str, Variant]:
        last = self._last
        if last is not None and self.signalled and not self._stale:
            return last[1]
        self._stale = False
        values = self.properties()
        if last is not None and last[0] == values:
            return last[1]
        built = {p.name: Variant(p.signature, values[p.name]) for p in self.spec.properties}
        self._last = (values, built)
        return built


_variants = Exported.variants


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
        # GetManagedObjects in wire format, one entry per path: the Variant dicts it was built
        # from (Exported.variants() hands back the same dict while the values stay equal) and
        # the marshalled (oa{sa{sv}}) entry padded to 8 bytes, with its unpadded length.
        self._entries: dict[str, tuple[tuple[dict[str, Variant], ...], bytes, int]] = {}
        self._uids: dict[str, int] = {}  # caller_uid's answers, by unique name
        bus.add_message_handler(self._on_message)

    # ---- the tree -----------------------------------------------------------------------

    def add(self, path: str, interfaces: list[Exported]) -> None:
        self.objects[path] = {e.spec.name: e for e in interfaces}
        if self.live:
            body = {e.spec.name: e.variants() for e in interfaces}
            self.signal(ROOT, OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}", [path, body])

    def remove(self, path: str) -> None:
        self._entries.pop(path, None)
        ifaces = self.objects.pop(path, None)
        if ifaces is not None and self.live:
            self.signal(ROOT, OBJECT_MANAGER, "InterfacesRemoved", "oas", [path, list(ifaces)])

    def properties_changed(self, path: str, interface: str, changed: dict[str, Any]) -> None:
        """Announce changed values; also the one way a ``signalled`` object's are re-read."""
        exported = self.objects.get(path, {}).get(interface)
        if exported is None:
            return
        exported.invalidate()  # even unannounced (not live yet): the next read reads again
        if not changed or not self.live:
            return
        sigs = {p.name: p.signature for p in exported.spec.properties}
        body = {k: Variant(sigs[k], v) for k, v in changed.items()}
        self.signal(path, PROPERTIES, "PropertiesChanged", "sa{sv}as", [interface, body, []])

    def signal(
        self, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> None:
        self.bus.send(Message.new_signal(path, interface, member, signature, body))

    def managed_objects(self, call: Message) -> Marshalled:
        """The GetManagedObjects reply, its body assembled from per-object cached entries.

        An object's entry is marshalled again only when its Variant dicts changed: for a
        ``signalled`` object (a VM) after Router.properties_changed, for the others whenever a
        read returns different values (they are read on every call). At 1,000 VMs this
        replaces marshalling ~450 KB per call with a join (docs/benchmarks.md).
        """
        parts: list[bytes] = [b""]  # [0]: the array's length and padding, once known
        end = 0
        entries = self._entries
        for path, ifaces in self.objects.items():
            if path == ROOT:
                continue
            variants = tuple(map(_variants, ifaces.values()))
            hit = entries.get(path)
            # Equal tuples (identical dicts, in practice) mean equal bytes.
            if hit is None or hit[0] != variants:
                entry = bytes(
                    Marshaller("(oa{sa{sv}})", [[path, dict(zip(ifaces, variants, strict=True))]])
                    .marshall()
                )  # fmt: skip
                hit = (variants, entry + bytes(-len(entry) % 8), len(entry))
                entries[path] = hit
            parts.append(hit[1])
            end = hit[2]
        if len(parts) > 1:  # no padding after the last entry
            parts[-1] = parts[-1][:end]
        # a{...}: the byte length of the elements, then padding to the entries' 8-byte alignment
        parts[0] = struct.pack("<I", sum(map(len, parts))) + bytes(4)
        return Marshalled(call, MANAGED_OBJECTS, b"".join(parts))

    # ---- dispatch -----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL:
            return False
        path = msg.path or ""
        if not (path == ROOT or path.startswith(ROOT + "/") or ROOT.startswith(path)):
            return False  # not ours: dbus-fast answers (UnknownObject/standard interfaces)
        sender = msg.sender or ""
        uid = self._uids.get(sender)
        if msg.interface == PROPERTIES and uid is not None and self.accepting:
            # Properties never wait: answered here, without a task, a timer or a loop
            # iteration (docs/benchmarks.md, single calls).
            with log.bind(sender=sender, uid=uid, method=f"{PROPERTIES}.{msg.member}"):
                try:
                    ifaces = self.objects.get(path)
                    if ifaces is None:
                        raise BusError("UnknownObject", f"No object at {path}.")
                    reply = Message.new_method_return(msg, *self._properties(msg, ifaces))
                except Exception as e:  # noqa: BLE001 - _fail types it
                    self._fail(msg, e)
                else:
                    self._send_reply(msg, reply)
            return True
        exported = self.objects.get(path, {}).get(msg.interface or "")
        if (
            exported is not None
            and msg.member in exported.immediate
            and uid is not None
            and self.accepting
            and not faults.active()
        ):
            with log.bind(sender=sender, uid=uid, method=f"{msg.interface}.{msg.member}"):
                try:
                    reply = self._run_now(msg, path, self.objects[path])
                except Exception as e:  # noqa: BLE001 - _fail types it
                    self._fail(msg, e)
                else:
                    self._send_reply(msg, reply)
            return True
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
        task = asyncio.ensure_future(self._process(msg, uid))
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
            async with asyncio.timeout(self.call_timeout):
                uid = await self.caller_uid(sender)
        except (NeuronError, TimeoutError):
            return None
        # A unique name never changes hands, so its uid is kept; the next call then needs no
        # lookup (and a Properties call no task). Bounded: a full cache starts again.
        if len(self._uids) >= _UID_CACHE:
            self._uids.clear()
        self._uids[sender] = uid
        return uid

    async def _process(self, msg: Message, uid: int | None) -> None:
        method = f"{msg.interface}.{msg.member}"
        if uid is None:
            uid = await self._uid(msg.sender or "")
        with log.bind(sender=msg.sender, uid=uid, method=method):
            try:
                if not self.accepting:
                    raise CancelledError("neurond is stopping; call again once it is back.")
                interactive = bool(msg.flags.value & _ALLOW_INTERACTIVE)
                interactive_allowed.set(interactive)
                # API.md: the call bound, plus the time a person spends in a polkit dialog.
                # asyncio.timeout, not wait_for: wait_for runs the call in a task of its own.
                timeout = self.call_timeout + (INTERACTIVE_EXTRA_S if interactive else 0)
                async with asyncio.timeout(timeout):
                    result = await self._dispatch(msg)
                reply: Message = (
                    result
                    if isinstance(result, Marshalled)
                    else Message.new_method_return(msg, *result)
                )
            except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - _fail types it
                self._fail(msg, e)
                return
            self._send_reply(msg, reply)

    def _fail(self, msg: Message, exc: BaseException) -> None:
        """Answer a failed call with its typed error (the one place exceptions become replies)."""
        if isinstance(exc, NeuronError):
            self._reply_error(msg, exc)
        elif isinstance(exc, BusError):
            self._send_reply(msg, Message.new_error(msg, exc.name, exc.text))
        elif isinstance(exc, InteractiveAuthorizationRequired):
            _log.info("%s.%s needs interactive authorization", msg.interface, msg.member)
            self._send_reply(msg, Message.new_error(msg, _INTERACTIVE_REQUIRED, str(exc)))
        elif isinstance(exc, TimeoutError):
            self._reply_error(
                msg,
                TimeoutError_(
                    f"{msg.member} did not finish within {self.call_timeout:g} s.",
                    details={"timeout_s": self.call_timeout},
                ),
            )
        elif isinstance(exc, asyncio.CancelledError):
            self._reply_error(
                msg, CancelledError(f"{msg.member} was cancelled because neurond is stopping.")
            )
        else:
            _log.error(
                "Unexpected failure in %s.%s", msg.interface, msg.member, exc_info=exc
            )
            self._reply_error(
                msg,
                InternalError(
                    f"{msg.member} failed because of an internal error in neurond; "
                    "the system journal has the details.",
                    cause=exc,
                ),
                logged=True,
            )

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
        if not msg.flags.value & _NO_REPLY_EXPECTED:
            self.bus.send(reply)

    async def _dispatch(self, msg: Message) -> tuple[str, list[Any]] | Marshalled:
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
        spec, handler = self._method(msg, path, ifaces)
        await faults.ahit(f"bus.{member}")
        return self._out(spec, await handler(Call(msg, path), *msg.body))

    def _method(
        self, msg: Message, path: str, ifaces: dict[str, Exported]
    ) -> tuple[Method, Handler]:
        """The called method's spec and handler, its arguments checked against the spec."""
        iface, member = msg.interface or "", msg.member or ""
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
        return spec, handler

    def _run_now(self, msg: Message, path: str, ifaces: dict[str, Exported]) -> Message:
        """Run an ``immediate`` method's handler to its end, here; its reply."""
        spec, handler = self._method(msg, path, ifaces)
        coro = handler(Call(msg, path), *msg.body)
        assert isinstance(coro, Coroutine)
        try:
            coro.send(None)
        except StopIteration as done:
            result = self._out(spec, done.value)
            if isinstance(result, Marshalled):
                return result
            return Message.new_method_return(msg, *result)
        coro.close()
        raise RuntimeError(f"{msg.member} is declared immediate but waited")

    @staticmethod
    def _out(spec: Method, result: Any) -> tuple[str, list[Any]] | Marshalled:
        if isinstance(result, Marshalled):
            return result
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
