"""VM states and the method-by-state table of API.md, as data."""

from __future__ import annotations

from enum import StrEnum


class VMState(StrEnum):
    CREATING = "creating"
    SHUTOFF = "shutoff"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    DELETING = "deleting"
    UNKNOWN = "unknown"


S = VMState
_ALL = frozenset(VMState)
_NOT_BUSY = _ALL - {S.CREATING, S.DELETING}


class Method(StrEnum):
    """The VM methods whose use depends on the state; values are used in messages and logs."""

    START = "start"
    SHUTDOWN = "shutdown"
    FORCE_OFF = "force-off"
    REBOOT = "reboot"
    RESET = "reset"
    PAUSE = "pause"
    RESUME = "resume"
    DELETE = "delete"
    DELETE_FORCE = "delete-force"
    SET_AUTOSTART = "set-autostart"
    GUEST = "guest"
    DISPLAY = "display"
    CREATE = "create"  # not a call: the slot a CreateVM job holds until it ends
    RENAME = "rename"
    SET_RESOURCES = "set-resources"  # SetMemory, SetVCPUs
    MEDIA = "change-media"  # ChangeMedia, EjectMedia


# API.md "What each method does in each state": anything not listed fails with InvalidState.
ALLOWED: dict[Method, frozenset[VMState]] = {
    Method.START: frozenset({S.SHUTOFF, S.CRASHED}),
    Method.SHUTDOWN: frozenset({S.RUNNING}),
    Method.FORCE_OFF: frozenset(
        {S.RUNNING, S.PAUSED, S.STARTING, S.STOPPING, S.CRASHED, S.PMSUSPENDED}
    ),
    Method.REBOOT: frozenset({S.RUNNING}),
    Method.RESET: frozenset({S.RUNNING}),
    Method.PAUSE: frozenset({S.RUNNING}),
    Method.RESUME: frozenset({S.PAUSED}),
    Method.DELETE: frozenset({S.SHUTOFF, S.CRASHED}),
    Method.DELETE_FORCE: _NOT_BUSY,
    Method.SET_AUTOSTART: _NOT_BUSY,
    Method.GUEST: frozenset({S.RUNNING}),
    Method.DISPLAY: frozenset({S.RUNNING, S.PAUSED}),
    Method.CREATE: frozenset(),  # only CreateVM itself takes this slot, on a new VM
    Method.RENAME: frozenset({S.SHUTOFF}),  # libvirt renames inactive domains only
    Method.SET_RESOURCES: _NOT_BUSY,
    # QEMU swaps media of a running or paused VM; shut off, the definition changes. Not while
    # starting/stopping (the devices are in flux) nor crashed/pmsuspended (ForceOff first).
    Method.MEDIA: frozenset({S.SHUTOFF, S.RUNNING, S.PAUSED}),
}

# States in which ChangeMedia/EjectMedia change the running VM too (vm-lifecycle, not vm-manage).
MEDIA_LIVE: frozenset[VMState] = frozenset({S.RUNNING, S.PAUSED})

# The state a method shows while it runs, with the reason it gives (API.md: the method's name).
TRANSIENT: dict[Method, tuple[VMState, str]] = {
    Method.START: (S.STARTING, "start"),
    Method.SHUTDOWN: (S.STOPPING, "shutdown"),
    Method.DELETE: (S.DELETING, "delete"),
    Method.DELETE_FORCE: (S.DELETING, "delete"),
    Method.CREATE: (S.CREATING, "create"),
}


def allowed(method: Method, state: VMState) -> bool:
    return state in ALLOWED[method]


# libvirt's virDomainState numbers → our states (API.md "States from libvirt").
FROM_LIBVIRT: dict[int, VMState] = {
    0: S.UNKNOWN,  # NOSTATE
    1: S.RUNNING,  # RUNNING
    2: S.RUNNING,  # BLOCKED
    3: S.PAUSED,  # PAUSED
    4: S.STOPPING,  # SHUTDOWN (being shut down)
    5: S.SHUTOFF,  # SHUTOFF
    6: S.CRASHED,  # CRASHED
    7: S.PMSUSPENDED,  # PMSUSPENDED
}

# libvirt's reason constants per virDomainState, lowercased with '_' as '-' (libvirt's
# enums virDomainRunningReason, virDomainPausedReason, …; index = the constant's value).
REASONS: dict[int, tuple[str, ...]] = {
    0: ("unknown",),
    1: (
        "unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused",
        "migration-canceled", "save-canceled", "wakeup", "crashed", "postcopy",
        "postcopy-failed",
    ),
    2: ("unknown",),
    3: (
        "unknown", "user", "migration", "save", "dump", "ioerror", "watchdog",
        "from-snapshot", "shutting-down", "snapshot", "crashed", "starting-up", "postcopy",
        "postcopy-failed", "api-error",
    ),
    4: ("unknown", "user"),
    5: (
        "unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
        "from-snapshot", "daemon",
    ),
    6: ("unknown", "panicked"),
    7: ("unknown",),
}  # fmt: skip


def from_libvirt(state: int, reason: int) -> tuple[VMState, str]:
    """Our (state, StateReason) for libvirt's (state, reason); unknown numbers give 'unknown'."""
    ours = FROM_LIBVIRT.get(state, S.UNKNOWN)
    names = REASONS.get(state, ())
    return ours, names[reason] if 0 <= reason < len(names) else "unknown"
