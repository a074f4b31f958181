"""Authorization of callers: one authorizer through which every method with an action passes.

First form (API.md's fallback while polkit is not consulted): on the system bus only uid 0 may
call a method that needs an action; on ``--session`` only the daemon's own uid. The caller's
uid comes from the bus daemon (GetConnectionUnixUser), cached per unique name until the name
leaves the bus.
"""

from __future__ import annotations

import logging
import os

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from neurond.errors import InternalError, PermissionDeniedError

_log = logging.getLogger("neurond.auth")

DBUS = "org.freedesktop.DBus"
ACTION_PREFIX = "org.neuronos.neuron1."


class Authorizer:
    def __init__(self, bus: MessageBus, session: bool) -> None:
        self.bus = bus
        self.allowed_uid = os.getuid() if session else 0
        self._uids: dict[str, int] = {}
        bus.add_message_handler(self._on_signal)

    async def start(self) -> None:
        """Subscribe to NameOwnerChanged so cached uids die with their connections."""
        await self._bus_call(
            "AddMatch",
            "s",
            [f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged'"],
        )

    def _on_signal(self, msg: Message) -> bool:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == DBUS
            and msg.body
            and not msg.body[2]
        ):
            self._uids.pop(msg.body[0], None)
        return False

    async def _bus_call(self, member: str, signature: str, body: list[object]) -> Message:
        reply = await self.bus.call(
            Message(
                destination=DBUS,
                path="/org/freedesktop/DBus",
                interface=DBUS,
                member=member,
                signature=signature,
                body=body,
            )
        )
        if reply is None or reply.message_type is MessageType.ERROR:
            raise InternalError(
                f"The bus daemon refused {member}: "
                f"{reply.body if reply is not None else 'no reply'}."
            )
        return reply

    async def uid(self, sender: str) -> int:
        if sender not in self._uids:
            reply = await self._bus_call("GetConnectionUnixUser", "s", [sender])
            self._uids[sender] = int(reply.body[0])
        return self._uids[sender]

    async def authorize(self, sender: str, action: str, vm: str = "") -> int:
        """Return the caller's uid if it may perform ``action``; else PermissionDenied."""
        uid = await self.uid(sender)
        if uid != self.allowed_uid:
            subject = f" on VM {vm!r}" if vm else ""
            raise PermissionDeniedError(
                f"User {uid} is not allowed to perform {ACTION_PREFIX}{action}{subject}.",
                details={"action": ACTION_PREFIX + action, "uid": uid, "vm": vm},
            )
        return uid
