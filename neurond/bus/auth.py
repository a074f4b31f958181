"""Authorization of callers: one authorizer through which every method with an action passes.

polkit decides (CheckAuthorization, subject ``system-bus-name`` of the caller, details ``vm``,
``uuid``, and for a VM ``owner``: the uid that created it, with ``owner_user`` its user name for
rules, which see the subject's name but not its uid), interactively only when the call carried
ALLOW_INTERACTIVE_AUTHORIZATION.
uid 0 is always allowed (polkit says so too, and root must keep working when polkit hangs).
Where polkit is not running, or ``authorization.polkit = false``, only uid 0 may act; on
``--session`` polkit is not consulted and only the daemon's own uid is served (API.md).

The caller's uid comes from the bus daemon (GetConnectionUnixUser), cached per unique name
until the name leaves the bus. A polkit yes is cached per (sender, action, VM) only while
polkit says it retains the authorization, and dropped when the sender leaves or polkit
signals ``Changed``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import pwd

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from neurond.errors import AuthorizationDismissedError, InternalError, PermissionDeniedError

_log = logging.getLogger("neurond.auth")

DBUS = "org.freedesktop.DBus"
POLKIT = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
ACTION_PREFIX = "org.neuronos.neuron1."
_ALLOW_USER_INTERACTION = 1
# Replies meaning "polkit is not there": then only uid 0 may act.
_POLKIT_ABSENT = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
}

# Set by the router for each call: did the caller allow interactive authorization?
interactive_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "interactive_allowed", default=False
)


def _text(owner: int | None) -> str:
    return "" if owner is None else str(owner)


def _details(vm: str, uuid: str, owner: int | None) -> dict[str, str]:
    """polkit's details of one check; ``owner_user`` only when the owner's uid has a name."""
    details = {k: v for k, v in (("vm", vm), ("uuid", uuid)) if v}
    if owner is not None:
        details["owner"] = _text(owner)
        try:
            details["owner_user"] = pwd.getpwuid(owner).pw_name
        except KeyError:  # a uid without a passwd entry: rules see no name to match
            pass
    return details


class InteractiveAuthorizationRequired(Exception):
    """polkit would ask the user, but the caller did not allow interaction (a bus error)."""


class Authorizer:
    def __init__(
        self, bus: MessageBus, session: bool, use_polkit: bool = True, timeout_s: float = 10.0
    ) -> None:
        self.bus = bus
        self.timeout_s = timeout_s  # a non-interactive polkit check that takes longer is a no
        self._absent_logged = False
        self.session = session
        self.use_polkit = use_polkit and not session
        self.own_uid = os.getuid()
        self._uids: dict[str, int] = {}
        # polkit's retained grants: (sender, action, vm, uuid, owner). The UUID and owner keep
        # a grant on the VM it was given for, not one that later takes over its name.
        self._granted: set[tuple[str, str, str, str, str]] = set()
        bus.add_message_handler(self._on_signal)

    async def start(self) -> None:
        """Follow callers leaving the bus and polkit's Changed signal (both drop caches)."""
        await self._bus_call(
            "AddMatch",
            "s",
            [f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged'"],
        )
        await self._bus_call(
            "AddMatch", "s", [f"type='signal',interface='{POLKIT_IFACE}',member='Changed'"]
        )

    def _on_signal(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL:
            return False
        if msg.member == "NameOwnerChanged" and msg.sender == DBUS and msg.body and not msg.body[2]:
            gone = msg.body[0]
            self._uids.pop(gone, None)
            self._granted = {g for g in self._granted if g[0] != gone}
        elif msg.interface == POLKIT_IFACE and msg.member == "Changed":
            self._granted.clear()
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

    async def authorize(
        self, sender: str, action: str, vm: str = "", uuid: str = "", owner: int | None = None
    ) -> int:
        """Return the caller's uid if it may perform ``action``; else raise the typed refusal.

        ``owner`` (a VM's creator, 0 when neurond did not create it) goes to polkit as details.
        """
        uid = await self.uid(sender)
        full = ACTION_PREFIX + action
        subject = f" on VM {vm!r}" if vm else ""
        facts = {"action": full, "uid": uid, "vm": vm}
        if self.session:
            if uid == self.own_uid:
                return uid
        elif uid == 0 or (sender, full, vm, uuid, _text(owner)) in self._granted:
            return uid
        elif self.use_polkit:
            # A name lookup may go to NSS (LDAP, …): off the loop.
            details = await asyncio.to_thread(_details, vm, uuid, owner)
            if await self._polkit(sender, full, details, facts, subject):
                return uid
        raise PermissionDeniedError(
            f"User {uid} is not allowed to perform {full}{subject}.", details=facts
        )

    async def _polkit(
        self,
        sender: str,
        action: str,
        details: dict[str, str],
        facts: dict[str, object],
        subject: str,
    ) -> bool:
        """Ask polkit; True for a yes, False when polkit is absent; raise for its refusals."""
        interactive = interactive_allowed.get()
        vm = details.get("vm", "")
        call = self.bus.call(
            Message(
                destination=POLKIT,
                path=POLKIT_PATH,
                interface=POLKIT_IFACE,
                member="CheckAuthorization",
                signature="(sa{sv})sa{ss}us",
                body=[
                    ["system-bus-name", {"name": Variant("s", sender)}],
                    action,
                    details,
                    _ALLOW_USER_INTERACTION if interactive else 0,
                    "",
                ],
                flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
                if interactive
                else MessageFlag.NONE,
            )
        )
        try:
            # A person may take minutes in a dialog; without one polkit must answer quickly.
            reply = await asyncio.wait_for(call, None if interactive else self.timeout_s)
        except TimeoutError:
            raise PermissionDeniedError(
                f"polkit did not answer within {self.timeout_s:g} s whether user {facts['uid']} "
                f"may perform {action}{subject}; try again.",
                details={**facts, "timeout_s": self.timeout_s},
            ) from None
        if reply is None or reply.message_type is MessageType.ERROR:
            name = reply.error_name if reply is not None else "no reply"
            if name in _POLKIT_ABSENT:
                if not self._absent_logged:  # once, not per call
                    _log.warning("polkit is not available (%s): only root may act", name)
                    self._absent_logged = True
                return False
            raise PermissionDeniedError(
                f"polkit could not decide {action}{subject}: {name} "
                f"{reply.body[0] if reply is not None and reply.body else ''}".rstrip()
                + ".",
                details=facts,
            )
        self._absent_logged = False
        authorized, challenge, result = reply.body[0]
        if authorized:
            if result.get("polkit.retains_authorization_after_challenge") in ("1", "true"):
                grant = (sender, action, vm, details.get("uuid", ""), details.get("owner", ""))
                self._granted.add(grant)  # as authorize looks it up: details hold _text(owner)
            return True
        if result.get("polkit.dismissed") in ("1", "true"):
            raise AuthorizationDismissedError(
                f"The authorization for {action}{subject} was dismissed.", details=facts
            )
        if challenge and not interactive:
            raise InteractiveAuthorizationRequired(
                f"{action}{subject} needs authentication; call again with interactive "
                "authorization allowed."
            )
        raise PermissionDeniedError(
            f"User {facts['uid']} is not allowed to perform {action}{subject}.", details=facts
        )
